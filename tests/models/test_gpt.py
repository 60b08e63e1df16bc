"""The GPT builder: forward/backward on CPU, SDPA attention equals megatron's local attention."""

import pytest
import torch

from megatron_miniplm import parallel
from presets import get_preset
from megatron_miniplm.models.gpt import build_model, resolve_implementation
from megatron_miniplm.models.config import LayerImpl, TrainingFusions


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    parallel.initialize(parallel.ParallelConfig(seed=11))


def _inputs(vocab, batch=2, seq=24):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    return tokens, torch.arange(seq).expand(batch, seq)


def test_cpu_resolution_of_megatron_defaults():
    """Megatron-LM's GPU defaults asked for on a CPU: local layers, the measured-faster attention
    for each job, no fusion that needs TE or apex, and the reasons said."""
    impl = resolve_implementation(LayerImpl(), TrainingFusions())
    assert (impl.spec, impl.attention, impl.attention_backend) == ("local", "local", "auto")
    assert not impl.rope_fusion and not impl.gradient_accumulation_fusion and impl.cross_entropy_fusion is None
    assert any("no Transformer Engine" in n for n in impl.notes)
    assert any("RoPE unfused" in n for n in impl.notes)
    assert any("gradient accumulation unfused" in n for n in impl.notes)
    assert resolve_implementation(LayerImpl(), forward_only=True).attention == "sdpa"
    assert resolve_implementation(LayerImpl(attention_backend="flash")).attention == "sdpa-flash"
    assert resolve_implementation(LayerImpl(attention_backend="unfused"), forward_only=True).attention == "local"
    fused_ce = resolve_implementation(LayerImpl(), TrainingFusions(cross_entropy_loss_fusion=True))
    assert fused_ce.cross_entropy_fusion == "native" and "cross entropy (native)" in fused_ce.describe()


def test_te_without_apex_leaves_gradient_accumulation_unfused(monkeypatch):
    """With TE's layers but no apex (a pip-installed TE), the fusion stays off: the output layer
    is megatron-core's own ColumnParallelLinear, which cannot be built fused without apex."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from megatron_miniplm.models import gpt

    monkeypatch.setattr(gpt, "transformer_engine_status", lambda: (True, "Transformer Engine 2.10"))
    impl = gpt.resolve_implementation(LayerImpl(), TrainingFusions())
    assert impl.spec == "transformer_engine" and not impl.gradient_accumulation_fusion
    assert any("apex" in n for n in impl.notes) and "apex" in impl.describe()
    # the premise: megatron-core's output layer refuses the fusion without apex
    tcfg = gpt.transformer_config(get_preset("tiny"), impl=gpt.PLAIN_LOCAL)
    tcfg.gradient_accumulation_fusion = True
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        ColumnParallelLinear(64, 512, config=tcfg, init_method=tcfg.init_method, bias=False, gather_output=False)


@pytest.mark.parametrize("asked, error", [
    (dict(layers=LayerImpl(attention_backend="fused")), "cuDNN attention"),
    (dict(fusions=TrainingFusions(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")),
     "needs Transformer Engine"),
])
def test_te_only_kernels_are_refused_without_te(asked, error):
    with pytest.raises(ValueError, match=error):
        resolve_implementation(asked.get("layers", LayerImpl()), asked.get("fusions"))


def test_unknown_choices_are_refused():
    with pytest.raises(ValueError, match="--attention-backend"):
        LayerImpl(attention_backend="sdpa")
    with pytest.raises(ValueError, match="--transformer-impl"):
        LayerImpl(transformer_impl="te")


def _impl(attention_backend, forward_only=False):
    return resolve_implementation(LayerImpl(attention_backend=attention_backend), forward_only=forward_only)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("sdpa_kind", ["auto", "flash"])
def test_sdpa_attention_matches_local(preset, sdpa_kind):
    config = get_preset(preset)
    local = build_model(config, impl=_impl("local"))
    sdpa = build_model(config, impl=_impl(sdpa_kind, forward_only=True))
    assert sdpa.miniplm_impl.attention == ("sdpa" if sdpa_kind == "auto" else "sdpa-flash")
    sdpa.load_state_dict(local.state_dict())
    tokens, positions = _inputs(config.vocab_size)
    want = local(tokens, positions, None, labels=tokens)
    got = sdpa(tokens, positions, None, labels=tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    for (name, a), (_, b) in zip(local.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_model_is_causal():
    """Changing a later token leaves earlier positions' logits unchanged."""
    config = get_preset("tiny")
    model = build_model(config)
    tokens, positions = _inputs(config.vocab_size, batch=1)
    changed = tokens.clone()
    changed[0, 15] = (changed[0, 15] + 1) % config.vocab_size
    a = model(tokens, positions, None)
    b = model(changed, positions, None)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_padded_vocab_and_tied_output():
    config = get_preset("tiny").replace(vocab_size=500)
    model = build_model(config)
    tokens, positions = _inputs(500)
    logits = model(tokens, positions, None)
    assert logits.shape[-1] == 512
    assert model.shared_embedding_or_output_weight() is model.embedding.word_embeddings.weight


def test_bf16_forward_backward_on_cpu():
    config = get_preset("tiny-gqa")
    model = build_model(config, params_dtype=torch.bfloat16, bf16=True)
    # norms too (megatron's torch-norm fallback makes them fp32): no mixed-dtype slow path
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens, positions = _inputs(config.vocab_size)
    loss = model(tokens, positions, None, labels=tokens)
    assert torch.isfinite(loss.float()).all()
    loss.float().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_initial_loss_is_near_uniform():
    """A freshly initialised model predicts close to uniform: loss ~ ln(vocab)."""
    config = get_preset("tiny")
    model = build_model(config)
    tokens, positions = _inputs(config.vocab_size)
    labels = torch.roll(tokens, 1, dims=1)  # not the input token, which a tied head favours
    loss = model(tokens, positions, None, labels=labels).mean().item()
    assert abs(loss - torch.log(torch.tensor(512.0)).item()) < 0.5


# A Transformer Engine install whose PyTorch part is broken: the top-level package imports
# (its __init__ swallows the failure, as TE's does), transformer_engine.pytorch does not.
_BROKEN_TE = {
    "transformer_engine/__init__.py": "__version__ = '9.9'\ntry:\n    from . import pytorch\nexcept Exception:\n    pass\n",
    "transformer_engine/pytorch/__init__.py": "raise OSError('libtransformer_engine.so: undefined symbol')\n",
}

_PROBE = """
import importlib, json
from megatron_miniplm import megatron_compat, platform
top = importlib.import_module("transformer_engine")  # what a top-level probe accepts
megatron_compat.apply()  # what every tool does first: megatron-core must now import
from megatron_miniplm.models import gpt
platform.cuda_available = lambda: True  # decide as on a GPU node
usable, why = gpt.transformer_engine_status()
impl = gpt.resolve_implementation(gpt.LayerImpl())
try:
    gpt.resolve_implementation(gpt.LayerImpl(attention_backend="fused"))
    forced = "built"
except ValueError as e:
    forced = str(e)
print(json.dumps([usable, why, impl.spec, impl.attention, impl.describe(), forced]))
"""


def test_broken_transformer_engine_counts_as_absent(tmp_path):
    import json
    import os
    import subprocess
    import sys

    for name, text in _BROKEN_TE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    usable, why, spec, attention, summary, forced = json.loads(out.stdout.strip().splitlines()[-1])
    assert not usable and "transformer_engine.pytorch" in why and "undefined symbol" in why
    assert (spec, attention) == ("local", "sdpa")
    assert "PyTorch SDPA" in summary and "undefined symbol" in summary
    assert "does not import" in forced and "undefined symbol" in forced


@pytest.mark.parametrize("first_import", [
    "megatron_miniplm.models.attention",  # imports megatron-core at module import
    "megatron.core.models.gpt",  # megatron-core itself, after the package
])
def test_a_broken_transformer_engine_never_reaches_megatron_core(tmp_path, first_import):
    """The probe runs before megatron-core's first import, wherever that import comes from: a
    broken TE then hides instead of crashing the import."""
    import os
    import subprocess
    import sys

    for name, text in _BROKEN_TE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    code = (f"import sys, megatron_miniplm, importlib; importlib.import_module({first_import!r}); "
            "print(sys.modules.get('transformer_engine', 'absent'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "None"  # blocked: megatron-core sees no TE


@pytest.mark.parametrize("compiler", [(True, "C compiler cc"), (False, "no C compiler (CC, cc, gcc, clang)")])
def test_compiled_fusions_only_where_triton_can_compile(monkeypatch, compiler):
    """On a GPU megatron-core's bias-SwiGLU and bias-dropout-add fusions are torch.compile'd at
    their first use: without a C compiler and Python headers they stay off, with a note,
    instead of failing at the first forward."""
    from megatron_miniplm import platform
    from megatron_miniplm.models import gpt

    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.setattr(platform, "kernel_compiler", lambda: compiler)
    impl = gpt.resolve_implementation(LayerImpl(transformer_impl="local"), forward_only=True)
    tcfg = gpt.transformer_config(get_preset("tiny"), impl=impl, allocate_on_device=False)
    assert impl.compiled_fusions == tcfg.bias_activation_fusion == tcfg.bias_dropout_fusion == compiler[0]
    assert (compiler[1] in impl.describe()) != compiler[0]


def test_no_compiled_fusions_on_a_cpu():
    impl = resolve_implementation(LayerImpl(), forward_only=True)
    assert not impl.compiled_fusions and "torch.compile" not in impl.describe()


def test_describe_on_cpu():
    assert resolve_implementation(LayerImpl(transformer_impl="local", apply_rope_fusion=False)).describe() == (
        "layers: megatron-core local spec, attention: megatron-core local (unfused), fused: none")
    assert "PyTorch SDPA" in _impl("auto", forward_only=True).describe()
