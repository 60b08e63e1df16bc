"""Keep freed memory in the process (glibc), so big activations are not page-faulted in
again at every layer of every batch.

glibc serves allocations above its mmap threshold (at most 32 MiB by default) with
fresh mmaps and returns them to the kernel on free. A CPU forward pass allocates
and frees such blocks in every layer (the MLP input of 8 x 1024 tokens is 50 MB in
bf16), and each one is page-faulted in again: about a million page faults per
batch of SmolLM2-135M, ~15% of the time (measured: sys time 1.8 s of 12 s -> 0.1 s).
Raising the mmap and trim thresholds keeps those pages in the heap for reuse; the
process then holds its peak memory, which a long scoring run reaches anyway.
This is what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do when set
before start-up; ``mallopt`` does it from inside the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """True when glibc accepted both thresholds; False (and nothing changed) elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS)
    ok = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    if not ok:
        log.debug("mallopt refused the thresholds; allocator left as it is")
    return ok
