"""Difference Sampling and its baselines, over all shards of a dataset at once.

Every method is one ranking plus one capacity, run by the same C++ machinery
(megatron_miniplm._cpp.select): instances are ranked by a score, ties by the lower
global index, and the longest prefix of the ranking that fits the capacity is kept,
the capacity being round(alpha * N) instances or a token budget.

    difference  reference mean NLL - teacher mean NLL, highest first (MiniPLM)
    teacher     teacher mean NLL, lowest first
    reference   reference mean NLL, highest first
    uniform     seeded uniform random ranking (no scores needed)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_miniplm import _cpp
from megatron_miniplm.settings import setting

METHODS = ("difference", "uniform", "teacher", "reference")
ORDERS = ("original", "shuffled")
# method -> (score kind for _cpp.compute_scores, rank the lowest first)
RANKINGS = {"difference": ("difference", False), "teacher": ("teacher", True), "reference": ("reference", False)}


class SelectionError(ValueError):
    """A selection that must not run; the message says why (and names the file)."""


@dataclass(frozen=True)
class SelectionConfig:
    """Which instances to keep; its settings are tools/difference_sample.py's flags."""

    method: str = setting("difference", group="selection", choices=METHODS,
                          help="difference (MiniPLM), or a baseline: uniform random, teacher (lowest "
                               "teacher NLL), reference (highest reference NLL)")
    alpha: Optional[float] = setting(None, group="selection", one_of="budget",
                                     help="fraction of instances to keep, in (0, 1]")
    keep_tokens: Optional[int] = setting(None, group="selection", one_of="budget",
                                         help="or a token budget: the best instances whose total fits")
    order: str = setting("original", group="selection", flag="--data-order", choices=ORDERS,
                         help="order of the blend's instances")
    seed: int = setting(1234, group="selection", help="seed of the shuffled order and the uniform baseline")
    num_threads: int = setting(0, group="selection", help="C++ worker threads (0: all cores)")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SelectionError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.order not in ORDERS:
            raise SelectionError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if (self.alpha is None) == (self.keep_tokens is None):
            raise SelectionError("give exactly one of alpha (a fraction of instances) or keep_tokens (a token budget)")
        if self.alpha is not None and not (math.isfinite(self.alpha) and 0.0 < self.alpha <= 1.0):
            raise SelectionError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.keep_tokens is not None and (not isinstance(self.keep_tokens, (int, np.integer)) or self.keep_tokens < 1):
            raise SelectionError(f"keep_tokens must be a positive integer, got {self.keep_tokens!r}")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**64:
            raise SelectionError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")

    @property
    def models_needed(self) -> tuple[str, ...]:
        return {"difference": ("teacher", "reference"), "teacher": ("teacher",),
                "reference": ("reference",), "uniform": ()}[self.method]


def instances_to_keep(alpha: float, n: int) -> int:
    """round(alpha * n), halves rounded up."""
    return min(n, int(math.floor(alpha * n + 0.5)))


def compute_scores(kind: str, teacher: Optional[list[np.ndarray]], reference: Optional[list[np.ndarray]],
                   offsets: np.ndarray, names: list[str], num_threads: int = 0,
                   keep: bool = True) -> Optional[np.ndarray]:
    """Per-instance scores of `kind` over all shards, float64 [N]; refuses any unusable row.

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
    return SelectionError(f"{name}: {how_many} without a finite {kind} score (NaN/infinite value or no "
                          f"counted token); first: instance {first}, " + "; ".join(rows))


def _capacity(config: SelectionConfig, n: int) -> int:
    return int(config.keep_tokens) if config.keep_tokens is not None else instances_to_keep(config.alpha, n)


def select(teacher: Optional[list[np.ndarray]], reference: Optional[list[np.ndarray]], offsets: np.ndarray,
           lengths: np.ndarray, config: SelectionConfig, names: Optional[list[str]] = None,
           keep_scores: bool = True) -> tuple["_cpp.Selection", Optional[np.ndarray]]:
    """Plans the selection (nothing is written yet): (selection, the scores ranked by).

    The scores are computed from the per-shard score arrays in the same C++ pass as the
    first ranking pass; a non-finite score refuses the run. `names[s]` names shard s's
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
