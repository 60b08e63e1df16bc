"""Chunked, vocab-parallel token NLL against a plain full-vocabulary log-softmax."""

import pytest
import torch

from megatron_miniplm.scoring.nll import chunk_tokens_for, per_instance_sums, vocab_parallel_nll

N, H, VOCAB, PADDED = 37, 16, 250, 256


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(PADDED, H, generator=g)
    weight[VOCAB:] = 5.0  # padding rows with large logits: must not leak into the softmax
    targets = torch.randint(0, VOCAB, (N,), generator=g)
    return hidden, weight, targets


def reference(hidden, weight, targets):
    logits = (hidden.double() @ weight.double().t())[:, :VOCAB]
    return -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_matches_full_log_softmax_for_any_chunking(chunk):
    hidden, weight, targets = data()
    got = vocab_parallel_nll(hidden, weight, targets, vocab_size=VOCAB, chunk_tokens=chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(hidden, weight, targets), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_give_fp32_nll_close_to_reference():
    hidden, weight, targets = data()
    got = vocab_parallel_nll(hidden.bfloat16(), weight.bfloat16(), targets, vocab_size=VOCAB, chunk_tokens=8)
    assert got.dtype == torch.float32
    ref = reference(hidden.bfloat16().float(), weight.bfloat16().float(), targets)
    torch.testing.assert_close(got.double(), ref, rtol=0.02, atol=0.15)


def test_chunk_budget():
    assert chunk_tokens_for(64 << 20, 49152) == 341
    assert chunk_tokens_for(1, 10) == 1


def test_empty_input():
    hidden, weight, targets = data()
    assert vocab_parallel_nll(hidden[:0], weight, targets[:0], vocab_size=VOCAB).shape == (0,)


def test_per_instance_sums_follow_the_mask():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    nll = torch.tensor([1.0, 2.0, 4.0, 8.0])
    got = per_instance_sums(nll, mask)
    assert got.dtype == torch.float64
    assert got.tolist() == [[7.0, 3.0], [0.0, 0.0], [8.0, 1.0]]


# Two TP ranks' vocabulary slices (padding on the last one) are combined in
# test_score_docs.py: TP=2 scores equal the direct per-instance computation.
