"""The evaluation's results: per model (seeds pooled), per domain, and the paired comparison.

``summarize`` turns each checkpoint's per-instance test scores into the results that
tools/evaluate.py prints, writes as JSON and as a markdown report. Checkpoints given
the same name are seeds of one model: its losses are the mean over seeds, with the
spread between them, and the paired comparison pools them (see compare.py).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from megatron_miniplm.evaluation.compare import (
    PairedDifference, compare_models, instance_losses, per_domain, spread,
)
from megatron_miniplm.evaluation.lm_loss import lm_loss_from_scores


def test_domains(data_path: str) -> tuple[Optional[np.ndarray], list[str]]:
    """Domain id per test instance (over every shard, global numbering) and the domain
    names; (None, []) when the dataset has no domain file."""
    from megatron_miniplm.selection.shards import DatasetError, domain_table, open_shards

    shards = open_shards([data_path])
    names, maps = domain_table(shards)
    try:
        ids = [s.mapped_domains(m) for s, m in zip(shards, maps)]
    except DatasetError:
        return None, []
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)), names


def test_documents(data_path: str, domains: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The test document each instance starts in (a cluster id per instance), or None where it
    cannot be known. Preprocessing cuts a domain's instances from that domain's documents in
    input order, each document ending in EOD, so an instance starts in the domain's document
    numbered by the EODs of the domain's earlier instances (over the shards in order). A subset
    that keeps that order (a split) can only merge documents whose EOD fell in a left-out
    instance: wider intervals, never narrower ones. A reordered blend has no such numbering
    (None). In ``document`` mode every instance is a document of its own."""
    from megatron_miniplm.selection.shards import open_shards

    shards = open_shards([data_path])
    modes = {s.meta.get("instance_mode") for s in shards}
    total = sum(s.num_instances for s in shards)
    if modes == {"document"}:
        return np.arange(total)
    eod = {s.meta.get("tokenizer", {}).get("eod_id") for s in shards}
    reordered = any((s.meta.get("selection") or {}).get("order", "original") != "original" for s in shards)
    if domains is None or reordered or not modes <= {"miniplm", "packed"} or len(eod) != 1 or None in eod:
        return None
    eod_id = eod.pop()
    eods = np.concatenate([_eods_per_instance(s, eod_id) for s in shards] or [np.zeros(0, np.int64)])
    documents = np.empty(total, dtype=np.int64)
    for d in np.unique(domains):
        sel = np.flatnonzero(domains == d)
        documents[sel] = np.concatenate([[0], np.cumsum(eods[sel])[:-1]])
    # one id per (domain, document of that domain)
    return np.unique(np.stack([domains.astype(np.int64), documents]), axis=1, return_inverse=True)[1].reshape(-1)


def _eods_per_instance(shard, eod_id: int) -> np.ndarray:
    """How many EOD tokens each instance of a shard holds, in one pass over its tokens."""
    itemsize = shard.index.token_dtype.itemsize
    tokens = np.frombuffer(shard.data, dtype=shard.index.token_dtype, count=len(shard.data) // itemsize)
    seen = np.concatenate([[0], np.cumsum(tokens == eod_id, dtype=np.int64)])
    starts = np.asarray(shard.index.pointers, dtype=np.int64) // itemsize
    return seen[starts + np.asarray(shard.index.lengths, dtype=np.int64)] - seen[starts]


def summarize(runs: dict, domains: Optional[np.ndarray], domain_names: Sequence[str], *,
              documents: Optional[np.ndarray] = None, bootstrap_samples: int = 10_000, seed: int = 0,
              level: float = 0.95, training_seeds: Optional[dict] = None) -> dict:
    """``runs``: {model: [(checkpoint, scores [N, 2]) per seed]} in table order; the first
    model is compared with every other one. ``training_seeds``: {model: each run's --seed}."""
    models, losses = {}, {}
    for name, seeds in runs.items():
        per_seed = [{"checkpoint": ckpt, **lm_loss_from_scores(scores)} for ckpt, scores in seeds]
        losses[name] = [instance_losses(scores) for _, scores in seeds]
        row = {k: float(np.mean([r[k] for r in per_seed])) for k in ("lm_loss", "token_weighted_loss", "perplexity")}
        row.update(instances=per_seed[0]["instances"], tokens=per_seed[0]["tokens"], seeds=len(per_seed),
                   lm_loss_std=spread([r["lm_loss"] for r in per_seed]), runs=per_seed)
        if domains is not None:
            doms = [per_domain(l, domains, domain_names) for l in losses[name]]
            row["domains"] = {d: {"lm_loss": float(np.mean([x[d]["lm_loss"] for x in doms])),
                                  "lm_loss_std": spread([x[d]["lm_loss"] for x in doms]),
                                  "instances": doms[0][d]["instances"]} for d in doms[0]}
        models[name] = row
    comparisons = compare_models(losses, domains, domain_names, documents=documents, samples=bootstrap_samples,
                                 seed=seed, level=level, seeds=training_seeds) if len(runs) > 1 else {}
    first = next(iter(runs))
    verdicts = [_difference(c["overall"]).verdict(c.get("base", first), other) for other, c in comparisons.items()]
    return {"models": models, "baseline_of_comparison": first, "comparisons": comparisons,
            "bootstrap": {"samples": bootstrap_samples, "seed": seed, "level": level}, "verdicts": verdicts}


def with_compute(results: dict) -> None:
    """Each verdict ends with what the two models' training cost, where both are known: a
    difference means little without it (the paper compares methods at equal training FLOPs)."""
    models, first = results["models"], results.get("baseline_of_comparison")
    verdicts = []
    for verdict, (other, c) in zip(results.get("verdicts", []), results.get("comparisons", {}).items()):
        base = c.get("base", first)
        fa, fb = models.get(base, {}).get("train_flops"), models.get(other, {}).get("train_flops")
        if fa and fb:
            ratio = fb / fa
            verdict += (f"; at equal training FLOPs ({fa:.3g})" if abs(ratio - 1) < 0.005
                        else f"; {other} trained with {ratio:.3g}x the FLOPs of {base}")
        verdicts.append(verdict)
    results["verdicts"] = verdicts


def _difference(d: dict) -> PairedDifference:
    return PairedDifference(mean=d["mean"], low=d["low"], high=d["high"], instances=d["instances"], level=d["level"],
                            documents=d.get("documents", 0), seeds=tuple(d.get("seeds", (1, 1))),
                            seed_std=d.get("seed_std"), seeds_paired=d.get("seeds_paired", False))


def supports_claim(d: dict) -> bool:
    """An interval that excludes zero and covers training seeds: what a table may mark."""
    return d["excludes_zero"] and _difference(d).covers_seeds


def _loss(row: dict) -> str:
    std = row.get("lm_loss_std")
    return f"{row['lm_loss']:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _ci(d: dict) -> str:
    mark = " *" if supports_claim(d) else ""
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{mark}"


def markdown(results: dict, *, curves: Optional[str] = None) -> str:
    """The evaluation report: losses per model and domain, the paired differences, verdicts."""
    models, comparisons = results["models"], results["comparisons"]
    first = results.get("baseline_of_comparison")
    level = results.get("bootstrap", {}).get("level", 0.95)
    lines = ["# Evaluation", ""]
    lines += [f"- {v}" for v in results.get("verdicts", [])]
    lines += ["", "## LM loss per model", "",
              "LM loss: mean over test instances of each instance's mean NLL (nats); "
              "± the standard deviation across seeds.", "",
              "| model | seeds | LM loss | token loss | instances | tokens | train FLOPs |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in models.items():
        flops = f"{r['train_flops']:.3g}" if r.get("train_flops") else ""
        if "lm_loss" in r:
            lines.append(f"| {name} | {r['seeds']} | {_loss(r)} | {r['token_weighted_loss']:.4f} | "
                         f"{r['instances']} | {r['tokens']} | {flops} |")
    domains = _domain_names(models)
    if domains:
        lines += ["", "## LM loss per domain", "", "| model | " + " | ".join(domains) + " |",
                  "|---|" + "---:|" * len(domains)]
        for name, r in models.items():
            cells = [_loss(r["domains"][d]) if d in r.get("domains", {}) else "" for d in domains]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        counts = [str(next(iter(models.values()))["domains"].get(d, {}).get("instances", "")) for d in domains]
        lines.append("| (instances) | " + " | ".join(counts) + " |")
    if comparisons:
        # what the bootstrap resampled: documents where the test set's are known, else instances
        unit = ("documents" if all(c["overall"].get("documents") for c in comparisons.values())
                else "instances (its documents are not known, so instances are taken as independent)")
        lines += ["", f"## {first} minus each other model", "",
                  f"Mean paired difference over test instances (seeds pooled) with its {100 * level:g}% interval: "
                  f"a bootstrap over the test set's {unit} ({results['bootstrap']['samples']} resamples, seed "
                  f"{results['bootstrap']['seed']}) and, where both models have two seeds or more, the seeds' "
                  "variance (compare.py); negative: lower loss than the other model; * the interval excludes "
                  "zero and covers training seeds. An interval of a model with one seed covers the test set "
                  "only and cannot tell a method effect from seed noise.", "",
                  "| against | overall | " + " | ".join(domains) + " |", "|---|---:|" + "---:|" * len(domains)]
        for other, c in comparisons.items():
            cells = [_ci(c["domains"][d]) if d in c["domains"] else "" for d in domains]
            lines.append(f"| {against(other, c)} | {_ci(c['overall'])} | " + " | ".join(cells) + " |")
    tasks = [(name, task, m) for name, r in models.items() for task, m in r.get("tasks", {}).items()]
    if tasks:
        lines += ["", "## Zero-shot tasks", "", "| model | task | result |", "|---|---|---|"]
        for name, task, m in tasks:
            result = (f"missing: {m['missing']}" if "missing" in m else
                      ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in m.items()))
            lines.append(f"| {name} | {task} | {result} |")
    if curves:
        lines += ["", "## Curves", "", f"![validation loss against tokens and FLOPs]({curves})"]
    if results.get("scaling"):
        from megatron_miniplm.evaluation.sweep import lines as sweep_lines

        lines += ["", "## Loss against training compute", ""] + [f"- {s.strip()}" for s in sweep_lines(results["scaling"])]
        if results["scaling"].get("plot"):
            lines += ["", f"![points, fitted curves and bands]({os.path.basename(results['scaling']['plot'])})"]
    return "\n".join(lines) + "\n"


def against(other: str, comparison: dict) -> str:
    """A comparison's row label: the other model, and the model it is compared with where that
    is not the first (a size sweep's comparisons within each size)."""
    return f"{other} (from {comparison['base']})" if comparison.get("base") else other


def _domain_names(models: dict) -> list[str]:
    names: list[str] = []
    for r in models.values():
        for d in r.get("domains", {}):
            if d not in names:
                names.append(d)
    return names


def write_report(path: str, results: dict, *, curves: Optional[str] = None) -> None:
    from megatron_miniplm.atomic_io import write_text_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, markdown(results, curves=curves))
