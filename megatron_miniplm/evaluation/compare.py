"""Did MiniPLM help, where, and how sure are we: paired differences with bootstrap intervals.

Every model is scored on the same test instances, so the comparison is paired: the
difference of two models' losses on instance i removes most of the between-instance
variance (short code snippets and long prose differ far more than two students do).
The interval is a percentile bootstrap over instances, seeded, so a rerun prints the
same numbers. Seeds of one model (several students trained with different seeds) are
pooled by averaging each instance's loss over the seeds before pairing; the spread
between seeds is reported beside it.

Per-domain figures use the domain of each test instance (PREFIX.domains.npy). The
paper's LM loss is the mean over instances of each instance's mean NLL, so a domain's
loss is the mean over its instances, and the overall loss is the instance-count
weighted mean of the domains' losses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np


def instance_losses(scores: np.ndarray) -> np.ndarray:
    """Mean NLL per instance from scorer rows (nll_sum, token_count); NaN where nothing counts."""
    scores = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scores[:, 1] > 0, scores[:, 0] / np.maximum(scores[:, 1], 1), np.nan)


def per_domain(losses: np.ndarray, domains: np.ndarray, names: Sequence[str]) -> dict:
    """{domain: {"lm_loss", "instances"}} over the instances that count (non-NaN loss)."""
    out = {}
    counted = ~np.isnan(losses)
    for d, name in enumerate(names):
        sel = counted & (domains == d)
        if sel.any():
            out[str(name)] = {"lm_loss": float(losses[sel].mean()), "instances": int(sel.sum())}
    return out


@dataclass(frozen=True)
class PairedDifference:
    """mean over instances of loss(a) - loss(b), with a percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    instances: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def verdict(self, a: str, b: str) -> str:
        """One sentence that says what the numbers support."""
        pct = f"{100 * self.level:g}%"
        head = f"{a} − {b} = {self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] nats"
        if self.high < 0:
            return f"{head}: {a} is lower at {pct}"
        if self.low > 0:
            return f"{head}: {a} is higher at {pct}"
        return f"{head}: not distinguishable from zero at {pct}"


def paired_difference(a: np.ndarray, b: np.ndarray, *, samples: int = 10_000, seed: int = 0,
                      level: float = 0.95, block: int = 256) -> PairedDifference:
    """Paired difference of two models' per-instance losses (NaN rows, where either has no
    counted token, are left out). Bootstrap resamples of the instances are drawn in blocks,
    so memory stays at block x instances whatever the test set's size."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired losses need the same instances: {a.shape} vs {b.shape}")
    d = a - b
    d = d[~np.isnan(d)]
    n = d.size
    if n == 0:
        raise ValueError("no instance is scored by both models")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for lo in range(0, samples, block):
        hi = min(samples, lo + block)
        means[lo:hi] = d[rng.integers(0, n, size=(hi - lo, n))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(mean=float(d.mean()), low=float(low), high=float(high), instances=int(n), level=level)


def pooled(runs: Sequence[np.ndarray]) -> np.ndarray:
    """Per-instance loss averaged over a model's seeds (all seeds score the same test set)."""
    stack = np.stack([np.asarray(r, dtype=np.float64) for r in runs])
    return stack.mean(axis=0)


def spread(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation across seeds; None with one seed."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def compare_models(losses: dict, domains: Optional[np.ndarray], domain_names: Sequence[str], *,
                   samples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """The first model against each other one: {other: {"overall": {...}, "domains": {...}}}.

    ``losses``: {model: [per-instance losses of each of its seeds]}, insertion-ordered.
    """
    names = list(losses)
    base = pooled(losses[names[0]])
    out = {}
    for other in names[1:]:
        theirs = pooled(losses[other])
        row = {"overall": paired_difference(base, theirs, samples=samples, seed=seed, level=level).as_dict(),
               "domains": {}}
        if domains is not None:
            for d, dname in enumerate(domain_names):
                sel = domains == d
                usable = sel & ~np.isnan(base) & ~np.isnan(theirs)
                if usable.sum() >= 2:
                    row["domains"][str(dname)] = paired_difference(
                        base[sel], theirs[sel], samples=samples, seed=seed, level=level).as_dict()
        out[other] = row
    return out
