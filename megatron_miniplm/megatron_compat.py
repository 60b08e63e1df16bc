"""megatron-core 0.16.1 on a machine without CUDA: the one place that patches a library.

megatron-core assumes CUDA in a few places: scratch buffers on ``torch.cuda.current_device()``,
``device="cuda"`` literals (the schedules' token counters, the optimizer's found-inf and
grad-norm tensors), ``torch.cuda.synchronize`` and streams, ``tensor.cuda()``, an RNG tracker
that reads and writes the CUDA generator, and optimizers that accept only tensors named as
CUDA ones. On a CPU-only machine each of those raises. ``apply()`` redirects them to this
process's device (``platform.device()``: the host), and only where CUDA is unavailable, so a
GPU run is never touched. What it patches, checked against megatron-core 0.16.1:

- the ``torch`` every ``megatron.core.*`` module sees (those imported before ``apply`` and,
  through an import hook, after it): a view of torch whose tensor factories (``empty``,
  ``zeros``, ``arange``, ...) put ``device="cuda"`` on this process's device and whose
  ``torch.cuda`` answers as a machine without CUDA but with a current device: ``is_available``
  False, ``current_device`` this process's device, ``synchronize`` / ``empty_cache`` no-ops,
  ``Stream`` / ``Event`` / ``stream`` no-op stand-ins, ``get_rng_state`` / ``set_rng_state`` /
  ``manual_seed`` the CPU generator's, memory statistics 0. User code keeps the real torch;
- ``torch.Tensor.cuda``: returns the tensor itself (on a CPU-only build it can only raise);
- ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``: the
  CPU generator's state, so the model-parallel RNG tracker forks the CPU generator (and its
  logger, which warns when the CPU generator moves inside a fork, is silenced: here it is the
  tracked generator);
- ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32`` (and its import in
  ``megatron.core.optimizer.optimizer``): the same scaling without the assertion that
  gradients are ``torch.cuda.FloatTensor``;
- ``Float16OptimizerWithFloat16Params.__init__`` and ``DistributedOptimizer.__init__``: run
  with ``Tensor.type()`` naming tensors of this process's device as CUDA ones, which is what
  their constructors sort parameters by; so ``--bf16`` builds the same bf16 parameters, fp32
  main parameters and (distributed) optimizer as on a GPU;
- ``megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu``: the token
  counts that the all-to-all dispatcher moves to the host as NumPy split sizes come out as
  NumPy where they are host tensors already (megatron-core converts only CUDA tensors, and
  ``all_to_all_single`` refuses a tensor of split sizes): expert parallelism on the host.

On every machine (``use_in_process_write_results``, ``moe_router_without_te``,
``compile_fusions_at_first_call``):

- ``megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue``: a queue of
  this process instead of one made in a spawned multiprocessing Manager (see there);
- ``megatron.core.jit.jit_fuser``: ``torch.compile`` called at a fused function's first call,
  not at its module's import (see there).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import types

import torch

from megatron_miniplm import platform
from megatron_miniplm.platform import _NullStream

_MEGATRON_PREFIX = "megatron.core"
_applied = False


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
            kwargs["device"] = platform.device()
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


def _cpu_cuda_namespace() -> types.SimpleNamespace:
    """What megatron's ``torch.cuda`` resolves to on CPU; anything else falls through."""
    real = torch.cuda

    class CpuCuda(types.SimpleNamespace):
        def __getattr__(self, name):
            return getattr(real, name)

    return CpuCuda(
        is_available=lambda: False,
        current_device=lambda: platform.device(),
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
        if args or kwargs or self.device.type != platform.device().type:
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
    platform.transformer_engine()
    if platform.cuda_available():
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
    _cpu_all_to_all_split_sizes()
    _applied = True
    return True


def _cpu_all_to_all_split_sizes() -> None:
    """The dispatcher's host copies of its split sizes as NumPy, as on a GPU (see the docstring)."""
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def moe_router_without_te() -> None:
    """megatron-core's MoE router asks whether Transformer Engine's GEMM is there through a name
    that its module defines only where TE imports (``moe_utils.te_general_gemm``): without TE
    (a CPU, an image without TE) every router forward raises NameError. Defined as None there,
    the router takes its own PyTorch path, as its code intends."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def use_in_process_write_results() -> None:
    """megatron-core's torch_dist writer returns its write results through a queue that it
    makes, at the first save, in a multiprocessing Manager started with spawn: what an
    asynchronous save, whose writer runs in another process, needs. A synchronous save puts
    and gets them in this process, and the spawned server must import torch to unpickle them
    on the way: seconds per rank at the first save of every run (benchmarks/RESULTS.md). A
    queue of this process carries them just as well. Saves here are synchronous (there is no
    --async-save); an asynchronous one would need megatron-core's own queue back.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _compile_at_first_call(fn):
    """``torch.compile(fn)``, made when the function is first called."""
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    return call


class _FusionsCompiledAtFirstCall(importlib.abc.MetaPathFinder):
    """Gives ``megatron.core.jit`` a ``jit_fuser`` that calls ``torch.compile`` at a fused
    function's first call instead of when its module is imported (``compile_fusions_at_first_call``)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "megatron.core.jit":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            exec_module(module)
            if getattr(module, "jit_fuser", None) is torch.compile:
                module.jit_fuser = _compile_at_first_call

        spec.loader.exec_module = patched_exec
        return spec


def compile_fusions_at_first_call() -> None:
    """megatron-core decorates its fused functions (bias-GELU, bias-SwiGLU, bias-dropout-add,
    ...) with ``torch.compile`` when their modules are imported, and ``torch.compile`` imports
    TorchInductor to make its wrapper: about half of megatron-core's import time (figures in
    benchmarks/RESULTS.md), paid by every rank of every tool, also where no fused function
    runs (the CPU path, a model without biases). torch.compile compiles at the first call
    either way; this makes the wrapper there too, so the compiled kernels and when they are
    built are the same. Call it before megatron-core is imported (``megatron_miniplm`` does,
    from its import hook); afterwards it changes nothing."""
    if "megatron.core.jit" not in sys.modules and not any(
            isinstance(f, _FusionsCompiledAtFirstCall) for f in sys.meta_path):
        sys.meta_path.insert(0, _FusionsCompiledAtFirstCall())
