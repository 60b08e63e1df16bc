#!/usr/bin/env python
"""How often the size sweep's 95% intervals (evaluation/scaling.py) hold the truth, on seeded
synthetic sweeps whose true curves are known: a baseline L(C) = 1.8 + 2.5 (C / 1e15)^-0.35 and
a method 0.1 nats below it, four sizes from 1e14 to 1e16 FLOPs, 40 test documents of 4
instances (document effect sd 0.3, instance noise sd 0.05), an offset per training run (sd
--seed-sd) and --seeds runs per point; 200 bootstrap refits per sweep. Counts the method's
savings (four per sweep) whose interval holds the true saving, and the baseline's
extrapolation to 1e17 FLOPs whose interval holds the true loss.

    python benchmarks/check_sweep_intervals.py [--trials 100]     # about a minute per row
"""

import argparse
import sys

import numpy as np

from megatron_miniplm.evaluation import scaling

L_INF, A, ALPHA, C0, SHIFT = 1.8, 2.5, 0.35, 1e15, -0.1
FLOPS = np.logspace(14, 16, 4)


def truth(c):
    return L_INF + A * (np.asarray(c) / C0) ** -ALPHA


def true_saving(c: float) -> float:
    return C0 * ((float(truth(c)) + SHIFT - L_INF) / A) ** (-1 / ALPHA) / c


def experiment(rng, seeds: int, seed_sd: float) -> list:
    documents = np.repeat(np.arange(40), 4)
    doc_effect = rng.normal(0, 0.3, 40)[documents]
    points = []
    for method, shift in (("base", 0.0), ("method", SHIFT)):
        for c in FLOPS:
            runs = [truth(c) + shift + doc_effect + rng.normal(0, seed_sd) + rng.normal(0, 0.05, documents.size)
                    for _ in range(seeds)]
            points.append(scaling.Point(method, f"{c:.0e}", float(c), runs))
    return points, documents


def coverage(trials: int, seeds: int, seed_sd: float) -> tuple[int, int]:
    """(savings whose interval holds the truth, extrapolations whose interval holds it)."""
    savings = extrapolations = 0
    for t in range(trials):
        points, documents = experiment(np.random.default_rng(100 + t), seeds, seed_sd)
        out = scaling.sweep(points, documents, baseline="base", target_flops=1e17, samples=200, seed=t)
        savings += sum(s["low"] <= true_saving(s["flops"]) <= s["high"] for s in out["saving"]["method"].values())
        e = out["extrapolation"]["base"]
        extrapolations += e["low"] <= float(truth(1e17)) <= e["high"]
    return savings, extrapolations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    print("| seeds per point | seed sd (nats) | savings in their 95% interval | extrapolations in theirs |")
    print("|---|---|---|---|")
    for seeds, seed_sd in ((3, 0.0), (3, 0.03), (1, 0.03)):
        savings, extrapolations = coverage(args.trials, seeds, seed_sd)
        print(f"| {seeds} | {seed_sd:g} | {savings} / {4 * args.trials} | {extrapolations} / {args.trials} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
