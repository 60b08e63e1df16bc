"""Did MiniPLM help, where, and how sure are we: paired differences with bootstrap intervals.

Every model is scored on the same test instances, so the comparison is paired: the
difference of two models' losses on instance i removes most of the between-instance
variance (short code snippets and long prose differ far more than two students do).
Seeds of one model (several students trained with different seeds) are pooled by
averaging each instance's loss over the seeds before pairing. The interval covers what
varies between repetitions of the experiment as far as the design shows it: the test
set (test documents resampled, ``paired_difference``) and, with two seeds or more of
each model, training; with one seed it says that it covers the test set only.

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
    """mean over test instances of loss(a) - loss(b), seeds pooled, with an interval over what
    varies between repetitions of the experiment that the design can see (``covers``)."""

    mean: float
    low: float
    high: float
    instances: int
    level: float
    documents: int = 0  # test documents resampled (0: instances taken as independent)
    seeds: tuple = (1, 1)  # training seeds of a and of b
    seed_std: Optional[float] = None  # seed-to-seed spread of the difference, with >= 2 seeds each
    seeds_paired: bool = False  # run k of each model shared its seed: the per-seed differences vary

    @property
    def covers_seeds(self) -> bool:
        return min(self.seeds) >= 2

    @property
    def covers(self) -> str:
        test = "test documents" if self.documents else "test instances"
        if not self.covers_seeds:
            return f"{test} only"
        return f"{test} and training seeds{' (paired by seed)' if self.seeds_paired else ''}"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds), "excludes_zero": self.excludes_zero,
                "covers": self.covers}

    def verdict(self, a: str, b: str) -> str:
        """One sentence that says what the numbers support, and what the interval covers."""
        pct = f"{100 * self.level:g}%"
        head = f"{a} − {b} = {self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] nats"
        if not self.covers_seeds:
            return (f"{head}: the interval covers {self.covers}; with one training seed "
                    f"{'per model' if max(self.seeds) < 2 else 'for ' + (a if self.seeds[0] < 2 else b)} "
                    f"it cannot tell a method effect from seed noise (train >= 2 seeds of each)")
        where = f"at {pct} over {self.covers}"
        if self.high < 0:
            return f"{head}: {a} is lower {where}"
        if self.low > 0:
            return f"{head}: {a} is higher {where}"
        return f"{head}: not distinguishable from zero {where}"


def paired_difference(a_runs: Sequence[np.ndarray], b_runs: Sequence[np.ndarray], *,
                      documents: Optional[np.ndarray] = None, samples: int = 10_000, seed: int = 0,
                      level: float = 0.95, block: int = 256, same_seeds: bool = False) -> PairedDifference:
    """Difference of two models' per-instance losses (each a list of per-seed arrays over the same
    test instances; instances that a run leaves without a counted token are left out), with an
    interval over the two sources of chance in such a comparison:

    - the test set: a percentile bootstrap that resamples test documents (``documents``: a
      document id per instance; instances cut from one document are not independent), or
      instances where no document ids are known; seeded, so a rerun prints the same numbers;
    - training: with >= 2 seeds of each model, the seed-to-seed variance of each model's mean
      loss (over its k seeds, /k) is added to the bootstrap's variance of the test-set part,
      and the interval is a t interval with Welch-Satterthwaite degrees of freedom (a
      bootstrap over 2-5 seeds would understate it). ``same_seeds``: run k of each model was
      trained with the same seed (the same initial weights and data-order stream), so the
      runs pair up: the variance is that of the k per-seed differences (/k, k - 1 degrees of
      freedom), which leaves out what the two runs of a seed share. With one seed of either
      model the interval is the test-set part alone, and ``verdict`` says so.
    """
    A = np.stack([np.asarray(r, dtype=np.float64) for r in a_runs])
    B = np.stack([np.asarray(r, dtype=np.float64) for r in b_runs])
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"paired losses need the same instances: {A.shape[1]} vs {B.shape[1]}")
    usable = ~np.isnan(A).any(axis=0) & ~np.isnan(B).any(axis=0)
    if not usable.any():
        raise ValueError("no instance is scored by both models")
    A, B = A[:, usable], B[:, usable]
    d = A.mean(axis=0) - B.mean(axis=0)
    groups = (np.unique(np.asarray(documents)[usable], return_inverse=True)[1] if documents is not None
              else np.arange(d.size))
    test_means = _cluster_bootstrap(d, groups, samples=samples, seed=seed, block=block)
    tail = (1 - level) / 2
    mean = float(d.mean())
    kinds = dict(instances=int(d.size), level=level, documents=int(groups.max() + 1) if documents is not None else 0,
                 seeds=(A.shape[0], B.shape[0]))
    if min(A.shape[0], B.shape[0]) < 2:
        low, high = np.percentile(test_means, [100 * tail, 100 * (1 - tail)])
        return PairedDifference(mean=mean, low=float(low), high=float(high), **kinds)
    test_part = (float(np.var(test_means, ddof=1)), int(groups.max()))  # (variance, degrees of freedom)
    if same_seeds and A.shape[0] == B.shape[0]:
        per_seed = A.mean(axis=1) - B.mean(axis=1)
        seed_parts = [(float(np.var(per_seed, ddof=1)) / per_seed.size, per_seed.size - 1)]
        seed_std = float(np.std(per_seed, ddof=1))
    else:
        seed_parts = [(float(np.var(A.mean(axis=1), ddof=1)) / A.shape[0], A.shape[0] - 1),
                      (float(np.var(B.mean(axis=1), ddof=1)) / B.shape[0], B.shape[0] - 1)]
        seed_std = math.sqrt(seed_parts[0][0] * A.shape[0] + seed_parts[1][0] * B.shape[0])
    parts = [test_part, *seed_parts]
    variance = sum(v for v, _ in parts)
    df = variance ** 2 / sum(v ** 2 / max(n, 1) for v, n in parts) if variance > 0 else math.inf
    half = t_quantile(1 - tail, df) * math.sqrt(variance)
    return PairedDifference(mean=mean, low=mean - half, high=mean + half, seed_std=seed_std,
                            seeds_paired=bool(same_seeds and A.shape[0] == B.shape[0]), **kinds)


def _cluster_bootstrap(d: np.ndarray, groups: np.ndarray, *, samples: int, seed: int, block: int) -> np.ndarray:
    """Bootstrap means of ``d`` resampling whole groups (the mean over the drawn groups'
    instances); drawn in blocks, so memory stays at block x groups whatever the test set's size."""
    sums = np.bincount(groups, weights=d)
    counts = np.bincount(groups).astype(np.float64)
    g = sums.size
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for lo in range(0, samples, block):
        hi = min(samples, lo + block)
        drawn = rng.integers(0, g, size=(hi - lo, g))
        means[lo:hi] = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    return means


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by integrating its
    density (numpy only; accurate to ~1e-4, far below the intervals' own uncertainty)."""
    if not math.isfinite(df) or df > 1e4:
        return _normal_quantile(p)
    x = np.linspace(0.0, 200.0, 400_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x))])
    return float(np.interp(p, cdf, x))


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


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
                   documents: Optional[np.ndarray] = None, samples: int = 10_000, seed: int = 0,
                   level: float = 0.95, seeds: Optional[dict] = None) -> dict:
    """The first model against each other one: {other: {"overall": {...}, "domains": {...}}}
    (in a size sweep, the first model's method at the other's size: its label in "base").

    ``losses``: {model: [per-instance losses of each of its seeds]}, insertion-ordered;
    ``documents``: the test document of each instance (None: instances taken as independent);
    ``seeds``: {model: the training seed of each of its runs} where known: two models whose runs
    have the same seeds are compared seed by seed (``paired_difference``'s ``same_seeds``).
    """
    names = list(losses)
    out = {}
    for other in names[1:]:
        first = base_of(names, other)
        base, theirs = losses[first], losses[other]
        same = _seed_order(seeds or {}, first, other)
        if same is not None:
            theirs = [theirs[k] for k in same]
        row = {"overall": paired_difference(base, theirs, documents=documents, samples=samples, seed=seed,
                                            level=level, same_seeds=same is not None).as_dict(), "domains": {}}
        if domains is not None:
            usable = ~np.isnan(pooled(base)) & ~np.isnan(pooled(theirs))
            for d, dname in enumerate(domain_names):
                sel = domains == d
                if (sel & usable).sum() >= 2:
                    row["domains"][str(dname)] = paired_difference(
                        [r[sel] for r in base], [r[sel] for r in theirs],
                        documents=None if documents is None else documents[sel],
                        samples=samples, seed=seed, level=level, same_seeds=same is not None).as_dict()
        if first != names[0]:
            row["base"] = first
        out[other] = row
    return out


def base_of(names: Sequence[str], other: str) -> str:
    """What ``other`` is compared with: the first model, or, in a size sweep (labels
    METHOD@SIZE), the first model's method at ``other``'s size where there is one."""
    first = names[0]
    method, at, _ = first.partition("@")
    size = other.partition("@")[2]
    same_size = f"{method}@{size}"
    if at and size and same_size in names and same_size != other:
        return same_size
    return first


def _seed_order(seeds: dict, a: str, b: str) -> Optional[list[int]]:
    """The order of b's runs that matches a's seeds one to one, where both models ran the same
    (>= 2, distinct, known) seeds; else None."""
    sa, sb = seeds.get(a), seeds.get(b)
    if not sa or not sb or len(sa) < 2 or None in sa or None in sb or len(set(sa)) != len(sa) \
            or sorted(sa) != sorted(sb):
        return None
    return [sb.index(x) for x in sa]
