"""Let megatron-core run on a machine without CUDA (CPU + gloo).

megatron-core assumes CUDA in a few places: scratch buffers on
``torch.cuda.current_device()``, ``device="cuda"`` literals (schedules' token
counters, optimizer found-inf / grad-norm tensors), ``torch.cuda.synchronize``
and streams, ``tensor.cuda()``, and an RNG tracker that reads and writes the
CUDA generator. On a CPU-only machine every one of those raises.

``apply()`` redirects them to the CPU, and only when CUDA is unavailable, so a
GPU run is never touched. The redirection is scoped: each ``megatron.core``
module sees a ``torch`` whose ``cuda`` namespace and tensor factories map the
CUDA device to the CPU; user code keeps the real ``torch``. The one global
change is ``Tensor.cuda`` returning the tensor itself, which on a CPU-only
build would otherwise only raise.

megatron-core's mixed-precision and distributed optimizers accept a parameter
only if ``param.type()`` names a CUDA tensor; their constructors see CPU
tensors named as CUDA ones, so that ``--bf16`` builds the same bf16 parameters,
fp32 main parameters and (distributed) optimizer on the CPU as on a GPU.

Transformer Engine is probed here too, on every machine: megatron-core guards
its TE imports against ImportError only, so a TE whose PyTorch part fails
otherwise (a library built for another torch or CUDA raises OSError) would
crash every import of megatron-core. Such an install is hidden, and
megatron-core falls back to its local layers as it does without TE.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Optional

import torch

_CPU = torch.device("cpu")
_MEGATRON_PREFIX = "megatron.core"
_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its CUDA device, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU


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
    import os
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
# busy machine's noise does not cross (measured so far: bf16 scoring 0.6x fp32 on one such CPU; GEMMs 4x on another).
BF16_MIN_SPEEDUP = 1.5


@functools.lru_cache(maxsize=None)
def bf16_is_fast() -> tuple[bool, str]:
    """Whether bf16 matmuls beat fp32 on this process's device, and why. On a GPU, yes; on a
    CPU with AMX (Sapphire Rapids and later), yes; on a CPU without bf16 instructions, no
    (emulated). On a CPU with AVX512-BF16 but no AMX it depends on the chip and on oneDNN:
    measured 495 vs 783 tokens/s (bf16 slower) scoring SmolLM2-135M on one such machine, and
    1255 vs 418 tokens/s (3x faster) on a 2-core AMD EPYC with torch 2.13, so it is measured
    here: bf16 when a GEMM of the shapes our models run takes it at least
    ``BF16_MIN_SPEEDUP`` times faster than fp32."""
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


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)  # an int means a CUDA ordinal


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


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


def _cpu_cuda_namespace() -> types.SimpleNamespace:
    """What megatron's ``torch.cuda`` resolves to on CPU; anything else falls through."""
    real = torch.cuda

    class CpuCuda(types.SimpleNamespace):
        def __getattr__(self, name):
            return getattr(real, name)

    return CpuCuda(
        is_available=lambda: False,
        current_device=lambda: _CPU,
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        Stream=_NullStream,
        Event=_NullStream,
        stream=lambda *a, **k: contextlib.nullcontext(),
        current_stream=lambda *a, **k: _NullStream(),
        default_stream=lambda *a, **k: _NullStream(),
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed,
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        memory_reserved=lambda *a, **k: 0,
        max_memory_reserved=lambda *a, **k: 0,
        reset_peak_memory_stats=lambda *a, **k: None,
    )


_FACTORIES = (
    "empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "tensor", "as_tensor", "arange", "rand", "randn", "randint", "randperm", "eye",
)


def _cpu_torch_module() -> types.ModuleType:
    """A view of ``torch`` in which CUDA means the CPU, for megatron modules only."""

    class CpuTorch(types.ModuleType):
        def __getattr__(self, name):  # attributes added to torch after the copy
            return getattr(torch, name)

    proxy = CpuTorch("torch")
    proxy.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
    for name in _FACTORIES:
        setattr(proxy, name, _on_cpu(getattr(torch, name)))
    proxy.cuda = _cpu_cuda_namespace()
    return proxy


def _patch_module(module: types.ModuleType, cpu_torch: types.ModuleType) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = cpu_torch


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Gives megatron.core modules imported after ``apply()`` the CPU view of torch."""

    def __init__(self, cpu_torch):
        self.cpu_torch = cpu_torch

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(_MEGATRON_PREFIX):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        cpu_torch = self.cpu_torch

        def patched_exec(module):
            exec_module(module)
            _patch_module(module, cpu_torch)

        spec.loader.exec_module = patched_exec
        return spec


def _cpu_rng_tracker_functions():
    """The RNG tracker's get/set state, routed to the CPU generator."""
    import megatron.core.tensor_parallel.random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, clone=False, **k: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The tracker warns whenever the CPU generator moves inside its fork; on CPU
    # the CPU generator *is* the tracked generator, so the warning is noise.
    logging.getLogger(mp_random.__name__).setLevel(logging.ERROR)


def _clip_grads_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's fp32 clipping asserts ``torch.cuda.FloatTensor`` grads; same math on CPU."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_([g.detach() for g in grads], coeff)


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda():
    """``Tensor.type()`` answers 'torch.cuda.BFloat16Tensor' for a bf16 tensor on this process's
    device (and so on)."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs or self.device.type != _CPU.type:
            return name
        return "torch.cuda." + name.rsplit(".", 1)[1]

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _cpu_mixed_precision_optimizers():
    """Build megatron's Float16 and distributed optimizers over CPU parameters: their
    constructors sort parameters by ``param.type()`` names of CUDA tensors only."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        init = cls.__init__

        @functools.wraps(init)
        def wrapped(self, *args, __init=init, **kwargs):
            with _cpu_tensors_named_as_cuda():
                __init(self, *args, **kwargs)

        cls.__init__ = wrapped


def _cpu_grad_clipping():
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grads_on_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grads_on_cpu


def apply() -> bool:
    """Redirect megatron-core's CUDA assumptions to the CPU when CUDA is absent.

    Idempotent; returns True when the CPU redirection is active. Call it before
    building models (``megatron_miniplm.parallel.initialize`` does).
    """
    global _applied
    transformer_engine()
    if cuda_available():
        return False
    if _applied:
        return True
    cpu_torch = _cpu_torch_module()
    sys.meta_path.insert(0, _PatchOnImport(cpu_torch))
    for name, module in list(sys.modules.items()):
        if name.startswith(_MEGATRON_PREFIX) and module is not None:
            _patch_module(module, cpu_torch)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _cpu_rng_tracker_functions()
    _cpu_grad_clipping()
    _cpu_mixed_precision_optimizers()
    _applied = True
    return True


# --- free memory and host copies (the scorer's sizing and its copies of results) ------

CPU_WORKING_BUDGET = 1 << 30


def free_memory() -> tuple[int, str]:
    """Bytes this process may still use for working buffers on its device, and where the
    figure comes from. The one place that asks the device: sizing code takes the number.

    GPU: what the driver reports free on this process's device (``torch.cuda.mem_get_info``),
    i.e. after the weights and the caching allocator's reserve: that is the real limit.
    CPU: a fixed budget of 1 GiB per process, never more than this machine's available RAM
    divided among its local ranks; deliberately not the available RAM itself. On a CPU the
    memory is not the limit but the caches are: bigger buffers only add memory traffic once
    the matmuls run at full speed (measured, SmolLM2-135M bf16, 8 x 1024 tokens, tokens per
    CPU-second: 1,474 with 256-row logits chunks, 1,513 with 1,024 rows, which this budget
    gives, 1,423 with 2,816 rows, which 2 GiB gave). The RAM is also shared by every rank of
    the machine and the page cache, and a buffer past glibc's 1 GiB kept-heap threshold
    (scoring/memory.py) would be page-faulted in again on every use.
    """
    if cuda_available():
        device_index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device_index)
        return int(free), (f"GPU {torch.cuda.get_device_name(device_index)}: {free / 2**30:.1f} of "
                           f"{total / 2**30:.1f} GiB free")
    import os

    import psutil

    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    available = psutil.virtual_memory().available // ranks
    budget = min(CPU_WORKING_BUDGET, available)
    return int(budget), (f"CPU: fixed {CPU_WORKING_BUDGET / 2**30:g} GiB working budget per process "
                         f"(available RAM per local rank: {available / 2**30:.1f} GiB)")


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
