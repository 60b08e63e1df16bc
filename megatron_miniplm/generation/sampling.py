"""Choosing the next token: temperature and nucleus (top-p) sampling from one uniform per row.

Each instance has its own random stream, seeded from (seed, instance id): the k-th token
generated for an instance is drawn from the k-th number of its stream, whichever batch,
replica or session decodes it. A token is the inverse of the (cut, renormalised) cumulative
distribution at that number, in float64, so that the same logits give the same token on
every rank of a tensor-parallel group.
"""

from __future__ import annotations

import numpy as np
import torch


def instance_seed(seed: int, instance_id: int) -> int:
    """The seed of an instance's stream: SeedSequence mixes (seed, id) so that neighbouring
    ids get unrelated streams."""
    return int(np.random.SeedSequence([seed, instance_id]).generate_state(1, np.uint64)[0] >> 1)


def instance_generators(seed: int, instance_ids) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(instance_seed(seed, int(i))) for i in instance_ids]


def stream_uniforms(generators: list[torch.Generator], steps: int) -> torch.Tensor:
    """float64 [rows, steps]: the next ``steps`` numbers of each row's stream, one draw per
    row (a CPU generator fills a tensor in order, so the k-th number is the one the k-th of
    single draws would give). A row's k-th token uses its k-th number, whether the row has
    stopped before or not."""
    return torch.stack([torch.rand(steps, generator=g, dtype=torch.float64) for g in generators])


def next_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """float64 [rows]: the next number of each row's stream."""
    return stream_uniforms(generators, 1)[:, 0]


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """int64 [rows]: one token per row of ``logits`` [rows, V].

    Temperature 0 is greedy: the first most likely token (as torch and transformers take it).
    Otherwise softmax(logits / temperature); with ``top_p`` < 1 only the most likely tokens
    are kept, in decreasing probability, while the mass of the tokens before them is below
    ``top_p`` (the first is always kept), as transformers' TopPLogitsWarper keeps them. Of
    equal probabilities across the cut the larger ids are kept: the warper's ascending sort
    leaves ties in id order where it is stable (short rows); over a whole vocabulary torch's
    sort is not stable, and the warper may keep other ids of the same probabilities.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = None
    if top_p < 1:
        probs, order = probs.sort(dim=-1, stable=True)
        probs, order = probs.flip(-1), order.flip(-1)
        before = probs.cumsum(dim=-1) - probs
        probs = probs * (before < top_p)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    # the first token whose cumulative mass exceeds the target: never one of zero probability
    return index.squeeze(1) if order is None else order.gather(1, index).squeeze(1)
