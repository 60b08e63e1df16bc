"""The decoding loop against a row-by-row reference: the same tokens, with one draw of random
numbers per row and a host sync every CHECK_EVERY steps instead of at every token."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_miniplm.generation import decode
from megatron_miniplm.generation.sampling import instance_generators, sample_tokens

VOCAB, PADDED, EOD = 50, 56, 0


class MarkovModel(torch.nn.Module):
    """Logits that depend on the last token and its position only (no layers: no KV cache), so
    that a reference can sample each row alone without the decoding loop."""

    def __init__(self, eod_boost: float):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        table = 3 * torch.randn(VOCAB, PADDED, generator=g)
        table[:, EOD] += eod_boost
        self.table = torch.nn.Parameter(table)
        self.by_position = 0.5 * torch.randn(128, PADDED, generator=g)
        self.decoder = SimpleNamespace(layers=[])
        self.calls = 0

    def forward(self, tokens, positions, mask, *, inference_context, runtime_gather_output):
        self.calls += 1
        return self.table[tokens] + self.by_position[positions]


def reference(model, prompts, ids, *, seed, max_length, temperature, top_p):
    """Each row alone: one number of its stream per token, until EOD or max_length."""
    rows = []
    for prompt, g in zip(prompts, instance_generators(seed, ids)):
        row = list(prompt)
        while len(row) < max_length and (len(row) == len(prompt) or row[-1] != EOD):
            logits = (model.table[row[-1]] + model.by_position[len(row) - 1])[:VOCAB].float()
            u = torch.rand(1, generator=g, dtype=torch.float64)
            row.append(int(sample_tokens(logits[None], u, temperature, top_p)[0]))
        rows.append(row)
    return rows


class Count(TorchDispatchMode):
    """Host syncs (a tensor's value read as a Python number) and random draws."""

    def __init__(self):
        super().__init__()
        self.syncs = self.draws = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        self.syncs += name.startswith("_local_scalar_dense")
        self.draws += name.startswith(("uniform", "rand"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("temperature,top_p,eod_boost", [
    (1.0, 1.0, -2.0), (0.7, 0.9, -2.0), (0.0, 1.0, -2.0),
    (1.0, 1.0, 4.0),  # every row samples EOD soon: the loop stops early
])
def test_decoding_equals_sampling_each_row_alone(temperature, top_p, eod_boost):
    model = MarkovModel(eod_boost)
    rng = np.random.default_rng(1)
    rows, n, max_length, seed = 8, 4, 70, 5
    prompts = rng.integers(1, VOCAB, size=(rows, n))
    ids = rng.permutation(1000)[:rows]
    want = reference(model, prompts, ids, seed=seed, max_length=max_length, temperature=temperature, top_p=top_p)
    with Count() as count:
        got = decode.generate_batch(model, prompts, instance_generators(seed, ids), max_length=max_length, eod=EOD,
                                    vocab=VOCAB, temperature=temperature, top_p=top_p)
    assert [g.tolist() for g in got] == want
    steps = max_length - n
    assert count.draws == rows  # one draw of a row's numbers, not one per token
    assert count.syncs <= steps // decode.CHECK_EVERY + 1, count.syncs
    if eod_boost > 0:
        assert max(len(w) for w in want) + decode.CHECK_EVERY < max_length  # every row stopped early ...
        assert model.calls <= max(len(w) for w in want) - n + decode.CHECK_EVERY  # ... and so did the loop
    elif temperature:
        assert {len(w) == max_length for w in want} == {True, False}  # rows that stop, rows that run to the end
