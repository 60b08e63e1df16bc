"""Difference Sampling and its baselines, over all shards of a dataset at once.

Every method is one ranking plus one capacity, run by the same C++ machinery
(megatron_miniplm._cpp.select): instances are ranked by a score, ties by the lower
global index, and the longest prefix of the ranking that fits the capacity is kept,
the capacity being round(alpha * N) instances or a token budget. An instance with no
counted prediction (one token, or only EOD inputs: the scorer's row is (0, 0)) has no
score: it ranks after every scored instance, ties by index, whatever the method.

    difference  reference mean NLL - teacher mean NLL, highest first (MiniPLM)
    teacher     teacher mean NLL, lowest first
    reference   reference mean NLL, highest first
    uniform     seeded uniform random ranking (no scores needed)
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from megatron_miniplm import _cpp
from megatron_miniplm.selection.config import SelectionConfig, SelectionError

# method -> (score kind for _cpp.compute_scores, rank the lowest first)
RANKINGS = {"difference": ("difference", False), "teacher": ("teacher", True), "reference": ("reference", False)}


def instances_to_keep(alpha: float, n: int) -> int:
    """round(alpha * n), halves rounded up."""
    return min(n, int(math.floor(alpha * n + 0.5)))


def compute_scores(kind: str, teacher: Optional[list[np.ndarray]], reference: Optional[list[np.ndarray]],
                   offsets: np.ndarray, names: list[str], num_threads: int = 0,
                   keep: bool = True) -> Optional[np.ndarray]:
    """Per-instance scores of `kind` over all shards, float64 [N] (NaN: unscored); refuses any unusable row.

    teacher / reference: per-shard [n_s, 2] (nll_sum, token_count) arrays, read in place.
    names[s]: how to name shard s's score files in an error. keep=False only checks (one
    shard-sized buffer instead of N scores) and returns None."""
    sizes = np.diff(offsets)
    out = np.empty(int(offsets[-1]) if keep else int(sizes.max(initial=0)), dtype=np.float64)
    for s in range(len(offsets) - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        t = teacher[s] if teacher is not None else None
        r = reference[s] if reference is not None else None
        dst = out[lo:hi] if keep else out[:hi - lo]
        bad, first = _cpp.compute_scores(kind, t, r, dst, num_threads=num_threads)
        if bad:
            raise _unusable(kind, names[s], f"{bad} instance(s)", first, t, r)
    return out if keep else None


def _unusable(kind: str, name: str, how_many: str, first: int, t: Optional[np.ndarray],
              r: Optional[np.ndarray]) -> SelectionError:
    """The refusal of unusable score rows: the files, the first row and its raw values."""
    rows = [f"{role} (nll_sum, token_count) = ({a[first, 0]!r}, {a[first, 1]!r})"
            for role, a in (("teacher", t), ("reference", r)) if a is not None]
    return SelectionError(f"{name}: {how_many} without a finite {kind} score (a NaN or infinite value, or a "
                          f"count of 0 beside a nonzero sum or in one file only); first: instance {first}, "
                          + "; ".join(rows))


def _capacity(config: SelectionConfig, n: int) -> int:
    return int(config.keep_tokens) if config.keep_tokens is not None else instances_to_keep(config.alpha, n)


def select(teacher: Optional[list[np.ndarray]], reference: Optional[list[np.ndarray]], offsets: np.ndarray,
           lengths: np.ndarray, config: SelectionConfig, names: Optional[list[str]] = None,
           keep_scores: bool = True) -> tuple["_cpp.Selection", Optional[np.ndarray]]:
    """Plans the selection (nothing is written yet): (selection, the scores ranked by).

    The scores are computed from the per-shard score arrays in the same C++ pass as the
    first ranking pass; an unusable row refuses the run. `names[s]` names shard s's
    score files in that error. Uniform needs no scores (and returns None for them); so does
    keep_scores=False (the selection then never writes the N scores out)."""
    n = int(offsets[-1])
    weights = lengths if config.keep_tokens is not None else None
    capacity = _capacity(config, n)
    if config.method == "uniform":
        sel = _cpp.select(None, capacity, weights=weights, random_seed=int(config.seed), n=n,
                          num_threads=config.num_threads)
        return sel, None
    kind, ascending = RANKINGS[config.method]
    scores = np.empty(n, dtype=np.float64) if keep_scores else None
    sel, bad, first = _cpp.select_scored(kind, teacher, reference, offsets, scores, capacity, weights=weights,
                                         ascending=ascending, num_threads=config.num_threads)
    if sel is None:  # `first` is global: name the shard holding it
        s = int(np.searchsorted(offsets, first, side="right") - 1)
        name = names[s] if names else f"shard {s}"
        raise _unusable(kind, name, f"{bad} instance(s) over all shards", first - int(offsets[s]),
                        teacher[s] if teacher is not None else None, reference[s] if reference is not None else None)
    return sel, scores


def write_blend(selection: "_cpp.Selection", offsets: np.ndarray, config: SelectionConfig, lengths: np.ndarray,
                out: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """The sampled blend, (shard, instance) int64 rows, into `out` if given (e.g. a memmap),
    and the tokens it keeps (summed in the same pass)."""
    if out is None:
        out = np.empty((selection.count, 2), dtype=np.int64)
    seed = int(config.seed) if config.order == "shuffled" else None
    tokens = selection.write_blend(out, offsets, shuffle_seed=seed, num_threads=config.num_threads, weights=lengths)
    return out, int(tokens)


def kept_mask(selection: "_cpp.Selection") -> np.ndarray:
    """bool [N]: which instances the selection keeps."""
    idx = np.empty(selection.count, dtype=np.int64)
    selection.write_indices(idx)
    mask = np.zeros(selection.n, dtype=bool)
    mask[idx] = True
    return mask
