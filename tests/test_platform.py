"""megatron-core without CUDA (megatron_compat): megatron sees CUDA as the CPU, user code keeps the
real torch; and the platform's facts."""

import sys

import pytest
import torch

from megatron_miniplm import megatron_compat, parallel, platform


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    parallel.initialize(parallel.ParallelConfig(seed=5))


def test_applied_only_without_cuda():
    assert not torch.cuda.is_available()
    assert megatron_compat.apply() is True
    assert platform.device() == torch.device("cpu")


def test_megatron_modules_see_cpu_cuda():
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.layers as layers

    for module in (schedules, layers):
        assert module.torch is not torch
        assert module.torch.cuda.current_device() == torch.device("cpu")
        assert module.torch.zeros(2, device="cuda").device.type == "cpu"
        assert module.torch.tensor([1.0], device=0).device.type == "cpu"
    # A megatron module imported after apply() is patched too.
    sys.modules.pop("megatron.core.transformer.utils", None)
    import megatron.core.transformer.utils as utils

    assert utils.get_default_causal_mask(4).device.type == "cpu"


def test_user_torch_is_untouched():
    assert torch.cuda.current_device is not None
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # default stream restored
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced


def test_same_seed_same_init_different_seed_different():
    from presets import get_preset
    from megatron_miniplm.models.gpt import build_model

    def weights(seed):
        parallel.initialize(parallel.ParallelConfig(seed=seed))
        return build_model(get_preset("tiny")).state_dict()

    a, b, c = weights(1), weights(1), weights(2)
    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])


def test_cuda_type_names_stay_inside_megatron_optimizers():
    """megatron's mixed-precision optimizers see CPU bf16 parameters named as CUDA tensors while
    they are built; everything else keeps torch's own names."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    from presets import get_preset
    from megatron_miniplm.training import engine

    parallel.initialize()
    chunks = engine.build_model_chunks(get_preset("tiny"), bf16=True)
    optimizer = engine.build_optimizer(chunks, engine.OptimizerSettings(), bf16=True)
    assert any(isinstance(o, Float16OptimizerWithFloat16Params) for o in optimizer.chained_optimizers)
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.BFloat16Tensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"


@pytest.mark.parametrize("flags,speedup,fast,why", [
    ({"avx512f", "amx_bf16", "avx512_bf16"}, None, True, "CPU with AMX"),
    ({"avx512f"}, None, False, "bf16 matmuls are emulated"),
    ({"avx512f", "avx512_bf16"}, 3.0, True, "measured 3.0x fp32's speed here (faster)"),
    ({"avx512f", "avx512_bf16"}, 1.2, False, "measured 1.2x fp32's speed here (not 1.5x faster)"),
])
def test_bf16_auto_on_a_cpu_measures_where_the_flags_cannot_tell(monkeypatch, flags, speedup, fast, why):
    def measured():
        assert speedup is not None, "measured although the flags decide"
        return speedup

    monkeypatch.setattr(platform, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(platform, "_bf16_matmul_speedup", measured)
    platform.bf16_is_fast.cache_clear()
    try:
        got, reason = platform.bf16_is_fast()
    finally:
        platform.bf16_is_fast.cache_clear()
    assert got is fast and why in reason


FUSED_AT_FIRST_CALL = """
import sys
import megatron_miniplm
import megatron.core.models.gpt
import torch

assert "torch._inductor.compile_fx" not in sys.modules, "TorchInductor imported with megatron-core"
from megatron.core.fusions import fused_bias_swiglu

made = []
torch.compile = lambda fn: made.append(fn) or fn  # what the first call compiles, recorded
x = torch.randn(3, 8)
got = fused_bias_swiglu.swiglu(x)
fused_bias_swiglu.swiglu(x)
assert made == [fused_bias_swiglu.swiglu.__wrapped__], made  # compiled once, at the first call
a, b = torch.chunk(x, 2, -1)
assert torch.equal(got, torch.nn.functional.silu(a) * b)
print("ok")
"""


def test_megatron_cores_fused_functions_are_compiled_at_their_first_call():
    """megatron-core wraps its fused functions with torch.compile at import, which imports
    TorchInductor into every process; they are compiled at their first call instead (a fresh
    interpreter: this one has megatron-core already)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FUSED_AT_FIRST_CALL], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
