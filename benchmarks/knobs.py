#!/usr/bin/env python
"""Where MiniPLM helps at the demo's scale: the miniature at a few settings of the knobs
that decide its outcome, each with the demo's three seeds per student, and the paired
difference MiniPLM - uniform that tools/evaluate.py prints for each.

    python benchmarks/knobs.py                          # every setting (each reruns the stages it changes)
    python benchmarks/knobs.py --base-from demo_runs    # reuse a finished `make demo` as the base
    python benchmarks/knobs.py --only base,alpha-0.3    # some settings

Each setting is the demo (tools/pipeline.py with no config) with a few overrides, in its own
work directory under --root. The base setting runs first; every other setting starts from a
hard-linked copy of the base's work directory, so only the stages its overrides change rerun
(the pipeline's fingerprints decide). Prints a Markdown table (one row per setting: each
student's held-out loss over its seeds, the seed-to-seed spread, the difference and its 95%
interval over test documents and training seeds, the worst loss spike and gradient norm of
its student runs) and writes a plot beside it (--plot).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what it varies, overrides of the demo's config)
SETTINGS = {
    "base": ("the demo as it ships", []),
    "student-epochs-2": ("twice the student tokens (two passes over the selection)", ["student.epochs=2"]),
    "alpha-0.3": ("keep 30% of the corpus (students see 0.6x the tokens)", ["selection.alpha=0.3"]),
    "reference-epochs-6": ("a reference trained 3x longer", ["reference.epochs=6"]),
    "student-lr-0.002": ("twice the students' learning rate (the recipe's noise)", ["student.train.lr=0.002"]),
    "student-warmup-0.2": ("a 4x longer student warm-up (the recipe's noise)", ["student.train.lr_warmup_fraction=0.2"]),
}


def run_setting(root: str, name: str, base_from: str | None, python: str) -> float:
    """Run (or resume) one setting's pipeline; the seconds it took."""
    work = os.path.join(root, name)
    seed_dir = base_from if name == "base" else os.path.join(root, "base")
    if not os.path.isdir(work) and seed_dir and os.path.isdir(seed_dir):
        _link_copy(seed_dir, work)
    cmd = [python, os.path.join(REPO, "tools", "pipeline.py"), f"work_dir={work}", *SETTINGS[name][1]]
    print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
    start = time.monotonic()
    with open(os.path.join(root, f"{name}.log"), "a") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return time.monotonic() - start


def _link_copy(src: str, dst: str) -> None:
    """A hard-linked copy of a finished work directory (its tools replace files by renaming,
    so a rerun stage never writes into a file the source still holds); the launch lock stays."""
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=os.link, ignore=shutil.ignore_patterns("launch.lock", "status.json"))
    os.replace(tmp, dst)


def row(root: str, name: str) -> dict:
    """One setting's figures from its evaluation's results.json."""
    [path] = glob.glob(os.path.join(root, name, "evaluate", "*", "results.json"))
    with open(path) as f:
        results = json.load(f)
    models = results["models"]
    diff = results["comparisons"]["student-uniform"]["overall"]
    return {
        "setting": name, "varies": SETTINGS[name][0], "overrides": SETTINGS[name][1],
        "miniplm": models["student-miniplm"]["lm_loss"], "miniplm_std": models["student-miniplm"].get("lm_loss_std"),
        "uniform": models["student-uniform"]["lm_loss"], "uniform_std": models["student-uniform"].get("lm_loss_std"),
        "miniplm_runs": [r["lm_loss"] for r in models["student-miniplm"]["runs"]],
        "uniform_runs": [r["lm_loss"] for r in models["student-uniform"]["runs"]],
        "reference": models.get("reference", {}).get("lm_loss"),
        "flops": models["student-miniplm"].get("train_flops"),
        "diff": diff["mean"], "low": diff["low"], "high": diff["high"], "diff_seed_std": diff.get("seed_std"),
        "seeds": diff["seeds"], "documents": diff["documents"], "covers": diff["covers"],
        **stability(os.path.join(root, name)),
    }


# A loss spike is one step's training loss above the mean of the steps before it; the mean,
# not the previous step, because one batch's loss differs from the next by the domains it
# happens to hold.
SPIKE_WINDOW = 5


def stability(work: str) -> dict:
    """The worst training instability among a work directory's student runs: the largest loss
    spike (one step's loss above the mean of the SPIKE_WINDOW steps before it) and the largest
    gradient norm after warm-up. The runs are the ones the stage records name (a copied work
    directory still holds the base's older runs)."""
    spike, grad = 0.0, 0.0
    for record in glob.glob(os.path.join(work, "records", "student-*.json")):
        with open(record) as f:
            out = json.load(f)["output"]
        steps = {}
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                entry = json.loads(line)
                if "loss" in entry:
                    steps[entry["iteration"]] = entry  # a resumed run logs its replayed steps again
        peak_lr = max(e["lr"] for e in steps.values())
        warmup_end = min(i for i, e in steps.items() if e["lr"] == peak_lr)
        losses = [steps[i]["loss"] for i in sorted(steps)]
        for k in range(SPIKE_WINDOW, len(losses)):
            spike = max(spike, losses[k] - sum(losses[k - SPIKE_WINDOW:k]) / SPIKE_WINDOW)
        grad = max([grad] + [e["grad_norm"] for i, e in steps.items() if i >= warmup_end])
    return {"loss_spike": spike, "max_grad_norm": grad}


def table(rows: list[dict]) -> str:
    out = ["| setting | varies | reference loss | uniform (seed sd) | MiniPLM (seed sd) | "
           "MiniPLM − uniform [95%] | per-seed differences | loss spike / grad norm | student FLOPs |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{a - b:+.3f}" for a, b in zip(r["miniplm_runs"], r["uniform_runs"]))
        out.append(
            f"| {r['setting']} | {r['varies']} | {r['reference']:.3f} | {r['uniform']:.3f} ({r['uniform_std']:.3f}) | "
            f"{r['miniplm']:.3f} ({r['miniplm_std']:.3f}) | {r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | "
            f"{per_seed} | {r['loss_spike']:.2f} / {r['max_grad_norm']:.1f} | {r['flops']:.2e} |")
    first = rows[0]
    out.append(f"\nIntervals: 95% over {first['covers']}, {first['seeds'][0]} seeds per student, "
               f"{first['documents']} test documents. Loss spike: the largest rise of one step's "
               f"training loss above the mean of the {SPIKE_WINDOW} steps before it; grad norm: the "
               "largest after warm-up (each the worst of the setting's student runs).")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    for i, r in enumerate(rows):
        ax.errorbar(r["diff"], i, xerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]], fmt="o", capsize=4,
                    color="C0")
        for a, b in zip(r["miniplm_runs"], r["uniform_runs"]):
            ax.plot(a - b, i + 0.15, "x", color="C1", ms=5)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(range(len(rows)), [r["setting"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("held-out loss, MiniPLM − uniform (nats; < 0: MiniPLM better)\n"
                  "o: mean and 95% interval over test documents and seeds; x: one seed pair")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.join(REPO, "benchmark_runs", "knobs"),
                        help="where each setting's work directory goes")
    parser.add_argument("--base-from", default=None,
                        help="a finished demo work directory to start the base setting from (its stages are reused)")
    parser.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings, base first")
    parser.add_argument("--plot", default=os.path.join(REPO, "benchmarks", "knobs.png"))
    parser.add_argument("--report-only", action="store_true", help="print the table of finished settings; run nothing")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"--only: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    os.makedirs(args.root, exist_ok=True)
    if not args.report_only:
        for name in (["base"] if "base" not in names else []) + names:
            print(f"   {name}: {run_setting(args.root, name, args.base_from, sys.executable):.0f} s", flush=True)
    rows = [row(args.root, n) for n in names
            if glob.glob(os.path.join(args.root, n, "evaluate", "*", "results.json"))]
    print(table(rows))
    if rows:
        plot(rows, args.plot)
        print(f"plot: {os.path.relpath(args.plot, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
