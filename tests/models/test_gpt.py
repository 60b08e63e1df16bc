"""The GPT builder: forward/backward on CPU, SDPA attention equals megatron's local attention."""

import pytest
import torch

from megatron_miniplm import parallel
from megatron_miniplm.models import get_preset
from megatron_miniplm.models.gpt import build_model, resolve_attention_backend


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    parallel.initialize(parallel.ParallelConfig(seed=11))


def _inputs(vocab, batch=2, seq=24):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    return tokens, torch.arange(seq).expand(batch, seq)


def test_cpu_uses_local_attention():
    assert resolve_attention_backend("auto") == "local"


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_sdpa_attention_matches_local(preset):
    config = get_preset(preset)
    local = build_model(config, attention_backend="local")
    sdpa = build_model(config, attention_backend="sdpa")
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
