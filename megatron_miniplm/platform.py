"""This process's device and what it can do: CUDA or the host, the distributed backend,
the device's RNG state, Transformer Engine and the kernel compiler, whether bf16 is the
fast path, and host copies. Facts only: what makes megatron-core run without CUDA is
``megatron_compat``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch

# The device this process computes on where it has no CUDA device: the host.
# tests/test_device_placement.py stands another device in for it, to see where a GPU would
# hold each tensor.
NO_CUDA_DEVICE = torch.device("cpu")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its CUDA device, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return NO_CUDA_DEVICE


def distributed_backend() -> str:
    """torch.distributed's backend: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if cuda_available() else "gloo"


def bind_local_device(local_rank: int) -> Optional[torch.device]:
    """Make this process's CUDA device the one of its local rank and return it (None on a
    CPU, where every process computes on the host)."""
    if not cuda_available():
        return None
    dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def device_name() -> Optional[str]:
    """The CUDA device's name ("NVIDIA H100 80GB HBM3", ...); None on a CPU."""
    return torch.cuda.get_device_name() if cuda_available() else None


RNG_DEVICE_KINDS = {"cuda": "GPU", "cpu": "CPU"}


def rng_device_kind() -> str:
    """Which generators this process's device RNG states are of: 'cuda' (the CUDA generator and
    megatron-core's RNG tracker on it), or 'cpu' where ``apply`` routes the tracker to the CPU
    generator. States of one kind do not fit the other's generators (their sizes differ)."""
    return "cuda" if cuda_available() else "cpu"


def device_rng_state() -> Optional[torch.Tensor]:
    """The CUDA generator's state, for checkpoints; None on a CPU, where megatron-core's RNG
    tracker is routed to the CPU generator (``apply``) and is saved with it."""
    return torch.cuda.get_rng_state() if cuda_available() else None


def set_device_rng_state(state: Optional[torch.Tensor]) -> None:
    """Restore what ``device_rng_state`` saved; a state saved on the other kind of machine
    (None, or no CUDA here) leaves the generator as seeded."""
    if state is not None and cuda_available():
        torch.cuda.set_rng_state(state)


@functools.lru_cache(maxsize=None)
def transformer_engine() -> tuple[bool, str]:
    """Whether Transformer Engine's PyTorch part imports here, and what it is or why not.

    A top-level ``import transformer_engine`` is not enough: its ``__init__``
    swallows a failed ``transformer_engine.pytorch`` import. A broken install is
    removed from ``sys.modules`` and blocked, so that megatron-core sees no TE.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return False, "not installed"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # ImportError, or OSError from a library built for another torch
        for name in [n for n in sys.modules if n.split(".")[0] == "transformer_engine"]:
            del sys.modules[name]
        sys.modules["transformer_engine"] = None  # imports of it now raise ImportError
        return False, f"transformer_engine.pytorch does not import ({type(e).__name__}: {e})"
    version = getattr(sys.modules["transformer_engine"], "__version__", "unknown version")
    return True, f"Transformer Engine {version}"


@functools.lru_cache(maxsize=None)
def kernel_compiler() -> tuple[bool, str]:
    """Whether torch.compile can build GPU kernels in this process, and what is missing if not.
    Its Triton backend compiles a small C launcher at a kernel's first use, which needs a host
    C compiler (``CC``, else cc, gcc or clang on PATH) and Python's headers; an image without
    them fails at the first forward that reaches a compiled function."""
    import shutil
    import sysconfig

    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return False, "no C compiler (CC, cc, gcc, clang) for Triton's kernel launchers"
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(headers):
        return False, f"no Python headers ({headers}) for Triton's kernel launchers"
    return True, f"C compiler {compiler}"


# bf16 must beat fp32 by this much in the measurement below to be chosen: a margin that a
# busy machine's noise does not cross (the figures behind it: benchmarks/RESULTS.md, "bf16 or
# fp32 on a CPU").
BF16_MIN_SPEEDUP = 1.5


@functools.lru_cache(maxsize=None)
def bf16_is_fast() -> tuple[bool, str]:
    """Whether bf16 matmuls beat fp32 on this process's device, and why. On a GPU, yes; on a
    CPU with AMX (Sapphire Rapids and later), yes; on a CPU without bf16 instructions, no
    (emulated). On a CPU with AVX512-BF16 but no AMX it depends on the chip and on oneDNN
    (bf16 measured slower than fp32 on one such machine and three times faster on another),
    so it is measured here: bf16 when a GEMM of the shapes our models run takes it at least
    ``BF16_MIN_SPEEDUP`` times faster than fp32. The pipeline records the decision per work
    directory (pipeline/stages.py), so that a timing never decides twice."""
    if cuda_available():
        return True, "GPU"
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return True, "CPU with AMX"
    if "avx512_bf16" not in flags:
        return False, "CPU without AMX or AVX512-BF16: bf16 matmuls are emulated, slower than fp32"
    speedup = _bf16_matmul_speedup()
    verdict = "faster" if speedup >= BF16_MIN_SPEEDUP else f"not {BF16_MIN_SPEEDUP:g}x faster"
    return speedup >= BF16_MIN_SPEEDUP, (f"CPU with AVX512-BF16, no AMX: bf16 GEMMs measured {speedup:.1f}x "
                                         f"fp32's speed here ({verdict})")


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def _bf16_matmul_speedup(rows: int = 1024, hidden: int = 576, ffn: int = 1536, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a [rows, hidden] x [hidden, ffn] GEMM (a small LM's MLP), best
    of ``repeats`` after a warm-up, on this process's threads (~0.1 s in all)."""
    import time

    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(rows, hidden).to(dtype)
        b = torch.randn(hidden, ffn).to(dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def pin(batch: dict) -> dict:
    """A host batch in page-locked memory on a GPU machine (its copies to the device can then
    overlap compute); as it is on a CPU, where there is no copy to overlap."""
    if not cuda_available():
        return batch
    return {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in batch.items()}


def hf_inference_dtype() -> str:
    """The dtype models exported to HF are run in for zero-shot tasks: bf16 on a GPU (as
    users serve them), fp32 on a CPU, where zero-shot runs are checks of the path and
    exactness matters more than speed."""
    return "bfloat16" if cuda_available() else "float32"


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NullStream()

    def record(self, *args):
        pass

    def wait(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True



def copy_to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Start copying ``tensor`` to the host without waiting: (host tensor, event). On a GPU the
    copy is queued behind the work that produces the tensor, into page-locked memory (torch
    allocates the destination of a non-blocking device-to-host copy pinned), and
    ``event.synchronize()`` waits for it alone; on the CPU the tensor already is on the host
    and the event is always complete."""
    if tensor.device.type != "cuda":
        return tensor, _NullStream()
    host = tensor.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event
