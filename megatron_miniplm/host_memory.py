"""Whether a run on the CPU keeps the host memory it frees: the setting that chooses it, the
call into glibc that does it, and the start-up line that says which. No torch: the config
modules declare the setting from here.

glibc serves allocations above its mmap threshold (at most 32 MiB by default) with fresh
mmaps and returns them to the kernel when they are freed. A CPU forward and backward pass
allocates and frees such blocks in every layer and for the logits (the demo student's are
hundreds of MB), and each one is page-faulted in again, 4 KiB at a time, at every step.
Raising the mmap and trim thresholds keeps those pages in the heap for reuse; the process
then holds its peak memory, which a long run reaches anyway. MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ do the same when set before start-up; mallopt does it from inside, so
every tool that computes on the CPU gets it however it is launched. On a GPU the host
allocates little and glibc's defaults are right. Measured gains are in
benchmarks/RESULTS.md ("Keeping freed host memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Optional

from megatron_miniplm.settings import setting

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
THRESHOLD = 1 << 30
# The settings of glibc's heap a user may have chosen: environment variables and tunables.
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
_MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.mmap_max",
                    "glibc.malloc.top_pad")


def keep_freed_memory_setting(group: str):
    """The ``keep_freed_memory`` setting (``--no-keep-freed-memory``) of a tool that computes on
    the CPU. Not fingerprinted: it changes how fast a run is, not what it makes."""
    return setting(True, group=group, flag="--no-keep-freed-memory", fingerprinted=False,
                   help="CPU: leave glibc's mmap/trim thresholds as they are (by default raised to "
                        f"{THRESHOLD >> 20} MiB, so that the activations and logits freed at every step are "
                        "not page-faulted in again at the next; heap settings in the environment, "
                        "MALLOC_*_ or GLIBC_TUNABLES, are kept; not in Megatron-LM, whose tensors live "
                        "on the GPU)")


def apply(keep: bool, device_type: str) -> Optional[str]:
    """Keep freed host memory where the run computes on the CPU and ``keep`` asks for it; the
    start-up line that says what the heap does, or None where the device is not the CPU."""
    if device_type != "cpu":
        return None
    if not keep:
        return "glibc's defaults (--no-keep-freed-memory)"
    return keep_freed()[1]


@functools.lru_cache(maxsize=None)
def keep_freed() -> tuple[bool, str]:
    """Raise glibc's mmap and trim thresholds to THRESHOLD, once per process; whether it did,
    and why. A user's own heap settings in the environment are kept; other C libraries are
    left alone."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(k in os.environ for k in _MALLOC_ENV) or any(t in tunables for t in _MALLOC_TUNABLES):
        return False, "glibc's heap settings from the environment kept"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        libc = None
    if not hasattr(libc, "gnu_get_libc_version"):
        return False, "not glibc: its allocator left as it is"
    if not (libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD)):
        return False, "glibc refused the thresholds: its allocator left as it is"
    return True, f"freed memory kept for reuse (glibc mmap and trim thresholds {THRESHOLD >> 20} MiB)"
