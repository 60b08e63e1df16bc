"""Loss against training compute: fitted curves, the computation saving, extrapolation.

The form fitted, per method, to (training FLOPs C, test loss L) points is the saturating
power law

    L(C) = L_inf + A * (C / C0) ** -alpha        (alpha > 0)

the compute form of the scaling laws of Kaplan et al. (2020, L(C) = (C_c / C) ** alpha_C,
here with an irreducible term as in Hoffmann et al., 2022): the form L_inf + (C_0 / C) ** alpha
that Henighan et al. (2020) fit to loss against compute, reparametrized. The fit leaves A
free: a curve with A <= 0 (a loss that does not fall) is printed with a caution and defines
no saving. MiniPLM (Gu et al., ICLR 2025) fits scaling curves of test loss against
training FLOPs to support its two compute claims: the computation saving (the same loss
with less compute) and the extrapolation of the benefit to larger budgets; the form it
fits could not be confirmed from the sources read (the official code holds no fitting
script), so this one is ours, stated with each result.
``C0`` is the geometric mean of the points' FLOPs, fixed before the fit, so that ``A`` is a
loss and the problem is well scaled; it changes nothing else.

The fit is variable projection: for a given alpha the curve is linear in (L_inf, A) and
solved by least squares, which leaves a one-dimensional search over alpha (a grid on
log alpha, then a golden-section refinement). Three parameters need three points to be
determined: ``fit_curve`` refuses fewer, and with exactly three the curve passes through
them wherever the form can (points that fall and bend toward a floor), so nothing is left
over to check the form — an extrapolation from it is a statement of the form's
assumption, which is why the sweep's outputs say how many sizes they rest on. Three
points the form cannot pass through (falling faster with log compute, or not falling)
leave alpha at the search's bound, and the curve says so (``caveats``).

Intervals come from a bootstrap over the two sources of chance the evaluation can see
(compare.py's units): the test documents (resampled once per draw and shared by every
point: the points are paired on the test set) and the training seeds of each point (a
Student-t draw per point from its seeds' spread, ``point_losses``; independent across
points). Each draw refits every curve; the band and the intervals are percentiles over the
draws. With one seed there is no seed part at all, and ``covers`` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

MIN_POINTS = 3  # parameters of the form
_ALPHAS = np.exp(np.linspace(math.log(1e-3), math.log(5.0), 400))


class TooFewPoints(ValueError):
    """A curve asked of fewer points than it has parameters."""


@dataclass(frozen=True)
class Curve:
    """L(C) = l_inf + a * (C / c0) ** -alpha."""

    a: float
    alpha: float
    l_inf: float
    c0: float
    rmse: float = 0.0

    def loss(self, flops) -> np.ndarray:
        return self.l_inf + self.a * (np.asarray(flops, dtype=np.float64) / self.c0) ** -self.alpha

    def flops_for(self, loss: float) -> float:
        """The compute at which the curve reaches ``loss``: inf where it never does (at or below
        its floor); NaN on a curve that does not fall with compute (``a <= 0``), where no compute
        is "needed" for a loss: it would reach a higher loss with less compute, or never leave its
        level, and inf would read as a method infinitely better than a baseline it trails."""
        if self.a <= 0 or self.alpha <= 0:
            return math.nan
        if loss <= self.l_inf:
            return math.inf
        return float(self.c0 * ((loss - self.l_inf) / self.a) ** (-1.0 / self.alpha))

    @property
    def caveats(self) -> list[str]:
        """What makes the curve a poor basis for extrapolation, in words (none: [])."""
        out = []
        if self.alpha <= _ALPHAS[0] * 1.01 or self.alpha >= _ALPHAS[-1] / 1.01:
            out.append(f"alpha at the search's bound ({self.alpha:.3g}): the points do not bend like the form, "
                       f"and the curve is a trend in log compute")
        if self.l_inf < 0:
            out.append("a floor l_inf below zero, which no loss reaches")
        if self.a <= 0:
            out.append("a loss that does not fall with compute")
        return out

    def as_dict(self) -> dict:
        return {"form": "L(C) = l_inf + a * (C / c0) ** -alpha", "a": self.a, "alpha": self.alpha,
                "l_inf": self.l_inf, "c0": self.c0, "rmse": self.rmse, "caveats": self.caveats}


def _linear_part(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(l_inf, a, sum of squared residuals) of y = l_inf + a * x by least squares."""
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    a = float(((x - xm) * (y - ym)).sum() / sxx) if sxx > 0 else 0.0
    l_inf = float(ym - a * xm)
    return l_inf, a, float(((l_inf + a * x - y) ** 2).sum())


def fit_curve(flops: Sequence[float], losses: Sequence[float]) -> Curve:
    """The least-squares curve of the module's form through (flops, loss) points."""
    c = np.asarray(flops, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(c) & np.isfinite(y) & (c > 0)
    c, y = c[keep], y[keep]
    if np.unique(c).size < MIN_POINTS:
        raise TooFewPoints(f"a curve L(C) = l_inf + a * C^-alpha has {MIN_POINTS} parameters and needs "
                           f"{MIN_POINTS} distinct compute points or more; got {np.unique(c).size}")
    c0 = float(np.exp(np.log(c).mean()))
    logc = np.log(c / c0)

    def sse(log_alpha: float) -> float:
        return _linear_part(np.exp(-math.exp(log_alpha) * logc), y)[2]

    grid = np.log(_ALPHAS)
    k = int(np.argmin(_grid_errors(_ALPHAS, logc, y)))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    best = _golden_section(sse, lo, hi)
    alpha = math.exp(best)
    l_inf, a, err = _linear_part(np.exp(-alpha * logc), y)
    return Curve(a=a, alpha=alpha, l_inf=l_inf, c0=c0, rmse=math.sqrt(err / y.size))


def _grid_errors(alphas: np.ndarray, logc: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``_linear_part``'s sum of squared residuals at every alpha of a grid, at once."""
    x = np.exp(-alphas[:, None] * logc[None, :])
    xc, yc = x - x.mean(axis=1, keepdims=True), y - y.mean()
    sxx = (xc * xc).sum(axis=1)
    a = np.where(sxx > 0, (xc * yc).sum(axis=1) / np.where(sxx > 0, sxx, 1), 0.0)
    return ((yc - a[:, None] * xc) ** 2).sum(axis=1)


def _golden_section(f, lo: float, hi: float, iterations: int = 60) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iterations):
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - ratio * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + ratio * (hi - lo)
            f2 = f(x2)
    return (lo + hi) / 2


def saving(baseline: Curve, flops: float, loss: float) -> float:
    """The computation saving of a method that reached ``loss`` with ``flops``: the compute the
    baseline's curve needs to reach that loss, over the method's (inf where it never does; NaN,
    undefined, where the baseline's curve does not fall with compute)."""
    return baseline.flops_for(loss) / flops


def within_run_saving(baseline_curve: Sequence[tuple[float, float]], flops: float, loss: float) -> dict:
    """The saving read from the baseline's validation curve during training (points of FLOPs
    and loss): the first compute at which its running best loss reaches ``loss``, interpolated
    linearly in log FLOPs between its two points (``at_most`` where its first point already
    does: the saving is a bound); where its curve ends above ``loss``, the curve fitted to its
    points (``fit_curve``) is extrapolated, and the result says so."""
    points = sorted((float(c), float(l)) for c, l in baseline_curve if c and c > 0 and np.isfinite(l))
    best = np.minimum.accumulate([l for _, l in points]) if points else np.zeros(0)
    reached = np.flatnonzero(best <= loss)
    if reached.size and reached[0] == 0:  # its first point reaches it: the compute needed is at most that
        return {"saving": points[0][0] / flops, "baseline_flops": points[0][0], "extrapolated": False,
                "at_most": True}
    if reached.size:
        k = int(reached[0])
        (c1, _), (c2, l2), l1 = points[k - 1], points[k], best[k - 1]
        needed = math.exp(math.log(c1) + (l1 - loss) / (l1 - l2) * (math.log(c2) - math.log(c1)))
        return {"saving": needed / flops, "baseline_flops": needed, "extrapolated": False}
    curve = fit_curve([c for c, _ in points], [l for _, l in points])
    needed = curve.flops_for(loss)
    return {"saving": needed / flops, "baseline_flops": needed, "extrapolated": True}


@dataclass
class Point:
    """One method at one size: its training FLOPs and each seed's per-instance test losses."""

    method: str
    size: str
    flops: float
    losses: list  # [per-instance losses of each seed], all over the same test instances


def point_losses(points: Sequence[Point], documents: Optional[np.ndarray], *, samples: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's loss (mean over the instances every run scores, of the mean over its seeds)
    and ``samples`` bootstrap draws of it ([samples, points]): test documents drawn once per
    draw for every point (instances taken as independent without ``documents``); at a point of
    k >= 2 seeds, each draw adds a seed deviation s / sqrt(k) * T, T a Student t with k - 1
    degrees of freedom and s the seeds' standard deviation of their mean losses. That is the
    t-interval compare.py takes for one model's seeds: resampling 2-5 seeds instead gives at
    most k^k distinct means, a variance (k - 1) / k of theirs and normal tails, so the bands
    came out too narrow (benchmarks/check_sweep_intervals.py)."""
    stacks = [np.stack([np.asarray(r, dtype=np.float64) for r in p.losses]) for p in points]
    usable = ~np.any([np.isnan(s).any(axis=0) for s in stacks], axis=0)
    if not usable.any():
        raise ValueError("no test instance is scored by every run of the sweep")
    groups = (np.unique(np.asarray(documents)[usable], return_inverse=True)[1].reshape(-1)
              if documents is not None else np.arange(int(usable.sum())))
    g = int(groups.max()) + 1
    counts = np.bincount(groups, minlength=g).astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, g, g), minlength=g) for _ in range(samples)]).astype(np.float64)
    estimate, draws = np.empty(len(points)), np.empty((samples, len(points)))
    for j, s in enumerate(stacks):
        sums = np.stack([np.bincount(groups, weights=run[usable], minlength=g) for run in s])  # [seeds, groups]
        estimate[j] = sums.mean(axis=0).sum() / counts.sum()
        draws[:, j] = (weights @ sums.mean(axis=0)) / (weights @ counts)
        if len(s) >= 2:
            spread = float(np.std(sums.sum(axis=1) / counts.sum(), ddof=1)) / math.sqrt(len(s))
            draws[:, j] += spread * rng.standard_t(len(s) - 1, samples)
    return estimate, draws


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of bootstrap values (no interpolation: inf stays inf)."""
    tail = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(values, dtype=np.float64), [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def covers(points: Sequence[Point], documents: Optional[np.ndarray]) -> str:
    """What the bootstrap resamples, in words: the test documents (instances where their
    documents are unknown) and, at points with two seeds or more, the training seeds; a point
    of one seed has no seed variation to resample, so its interval covers the test set alone."""
    test = "test documents" if documents is not None else "test instances"
    seeds = [len(p.losses) for p in points]
    if min(seeds) >= 2:
        return f"{test} and training seeds"
    if max(seeds) < 2:
        return f"{test} only (one training seed per point: they cannot tell a method effect from seed noise)"
    return f"{test}, and training seeds only at the points with two or more"


def refusal(flops: dict) -> Optional[str]:
    """Why the sweep cannot be fitted (None where every method has enough sizes): ``flops``,
    {method: the training FLOPs of each of its sizes}; sizes of equal FLOPs are one point of
    the curve (``fit_curve`` counts distinct compute)."""
    short = {m: len(set(f)) for m, f in flops.items() if len(set(f)) < MIN_POINTS}
    if not short:
        return None
    which = ", ".join(f"{m} ({n})" for m, n in short.items())
    return (f"no fit, saving or extrapolation from the sweep: each method needs {MIN_POINTS} sizes or more, "
            f"of distinct training FLOPs, and {which} has fewer. The curve L(C) = l_inf + a * C^-alpha has "
            f"{MIN_POINTS} parameters: fewer points leave it undetermined (any floor l_inf fits them), so its "
            f"extrapolation would be a guess")


def sweep(points: Sequence[Point], documents: Optional[np.ndarray], *, baseline: Optional[str],
          target_flops: Optional[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Per method: the fitted curve with a band; per other method and size: the computation
    saving against ``baseline``'s curve; per method: the loss extrapolated to ``target_flops``
    (default: 10x the sweep's largest compute); each with its bootstrap interval. With fewer
    than three sizes of a method, only the points, and ``refused`` says why."""
    estimate, draws = point_losses(points, documents, samples=samples, seed=seed)
    methods = list(dict.fromkeys(p.method for p in points))
    sizes = {m: [p.size for p in points if p.method == m] for m in methods}
    out = {"form": Curve(1, 1, 0, 1).as_dict()["form"], "level": level, "samples": samples,
           "covers": covers(points, documents),
           "points": [{"method": p.method, "size": p.size, "flops": p.flops, "loss": float(estimate[j]),
                       **dict(zip(("low", "high"), _interval(draws[:, j], level)))} for j, p in enumerate(points)],
           "sizes": sizes, "refused": refusal({m: [p.flops for p in points if p.method == m] for m in methods})}
    if out["refused"]:
        return out
    target = float(target_flops or 10 * max(p.flops for p in points))
    grid = np.exp(np.linspace(math.log(min(p.flops for p in points)), math.log(max(target, max(p.flops for p in points))), 60))
    index = {m: [j for j, p in enumerate(points) if p.method == m] for m in methods}
    flops = np.array([p.flops for p in points])
    curves = {m: fit_curve(flops[index[m]], estimate[index[m]]) for m in methods}
    boot = [{m: fit_curve(flops[index[m]], draws[b, index[m]]) for m in methods} for b in range(samples)]
    out["target_flops"] = target
    out["fits"] = {m: {**curves[m].as_dict(), "sizes": len(index[m]), "band": _band(curves[m], [b[m] for b in boot],
                                                                                     grid, level)}
                   for m in methods}
    out["extrapolation"] = {m: {"flops": target, "loss": float(curves[m].loss(target)),
                                **dict(zip(("low", "high"), _interval([b[m].loss(target) for b in boot], level)))}
                            for m in methods}
    if baseline in curves:
        out["baseline"] = baseline
        out["saving"] = {m: _savings(points, index[m], estimate, draws, curves[baseline], [b[baseline] for b in boot],
                                     level) for m in methods if m != baseline}
    return out


def _savings(points, where: list, estimate, draws, baseline: Curve, boot: list, level: float) -> dict:
    """{size: the saving of the point against the baseline's curve, with its interval}. Draws
    whose refitted baseline does not fall (an undefined saving) are counted at either end: the
    low bound as if they were 0, the high one as if infinite, so that the interval holds
    whatever they stand for; ``undefined`` says how many there were."""
    out = {}
    for j in where:
        flops = points[j].flops
        values = np.array([saving(b, flops, draws[k, j]) for k, b in enumerate(boot)])
        undefined = np.isnan(values)
        low = _interval(np.where(undefined, 0.0, values), level)[0]
        high = _interval(np.where(undefined, math.inf, values), level)[1]
        out[points[j].size] = {"flops": flops, "saving": saving(baseline, flops, estimate[j]), "low": low, "high": high,
                               "undefined": int(undefined.sum())}
    return out


def _band(curve: Curve, boot: list, grid: np.ndarray, level: float) -> dict:
    values = np.stack([b.loss(grid) for b in boot])
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail], axis=0)
    return {"flops": grid.tolist(), "loss": curve.loss(grid).tolist(), "low": low.tolist(), "high": high.tolist()}
