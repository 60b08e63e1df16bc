"""The comparison table tools/evaluate.py and the pipeline print, formatted in one place."""

from __future__ import annotations

from megatron_miniplm.evaluation.report import against, supports_claim


def format_table(results: dict) -> str:
    """Per model: LM loss (mean over instances of the per-instance mean NLL; mean ± spread
    over seeds), token-weighted loss, perplexity, counts and training FLOPs (where the
    checkpoint records them: compute including a Vanilla KD teacher's forward passes) and, for a
    SeqKD student, the teacher's forward FLOPs that generated its corpus (``gen FLOPs``);
    the LM loss per domain; the first model minus each other one with its interval;
    zero-shot metrics; the sentences the numbers support."""
    models = results["models"]
    rows = list(models.items())
    width = max([24] + [len(name) + 2 for name, _ in rows])
    lines = []
    flops = any(r.get("train_flops") for _, r in rows)
    generation = any(r.get("generation_flops") for _, r in rows)
    seeds = any(r.get("seeds", 1) > 1 for _, r in rows)
    if any("lm_loss" in r for _, r in rows):
        loss_w = 19 if seeds else 10
        lines.append(f"{'model':<{width}}{'LM loss':>{loss_w}}{'token loss':>12}{'ppl':>10}{'instances':>11}"
                     f"{'tokens':>10}" + (f"{'seeds':>7}" if seeds else "") + (f"{'train FLOPs':>13}" if flops else "")
                     + (f"{'gen FLOPs':>11}" if generation else ""))
        for name, r in rows:
            if "lm_loss" not in r:
                continue
            std = r.get("lm_loss_std")
            loss = f"{r['lm_loss']:.4f}" + (f" ± {std:.4f}" if std is not None else "")
            lines.append(f"{name:<{width}}{loss:>{loss_w}}{r['token_weighted_loss']:>12.4f}"
                         f"{r['perplexity']:>10.2f}{r['instances']:>11}{r['tokens']:>10}"
                         + (f"{r.get('seeds', 1):>7}" if seeds else "")
                         + (f"{r['train_flops']:>13.3g}" if r.get("train_flops") else (" " * 13 if flops else ""))
                         + (f"{r['generation_flops']:>11.3g}" if r.get("generation_flops") else ""))
    domains = []
    for _, r in rows:
        domains += [d for d in r.get("domains", {}) if d not in domains]
    if domains:
        col = max([12] + [len(d) + 2 for d in domains])
        lines += ["", f"{'LM loss per domain':<{width}}" + "".join(f"{d:>{col}}" for d in domains)]
        for name, r in rows:
            if r.get("domains"):
                lines.append(f"{name:<{width}}" + "".join(
                    f"{r['domains'][d]['lm_loss']:>{col}.4f}" if d in r["domains"] else " " * col for d in domains))
        first = rows[0][1].get("domains", {})
        lines.append(f"{'(test instances)':<{width}}" + "".join(f"{first.get(d, {}).get('instances', ''):>{col}}"
                                                                for d in domains))
    comparisons = results.get("comparisons") or {}
    if comparisons:
        level = 100 * results["bootstrap"]["level"]
        against_rows = [(against(o, c), c) for o, c in comparisons.items()]
        w = max([len(results["baseline_of_comparison"]) + 10] + [len(o) + 2 for o, _ in against_rows])
        lines += ["", f"{results['baseline_of_comparison'] + ' minus':<{w}}{'domain':<16}"
                  f"difference [{level:g}% interval]  (* excludes 0, seeds covered)"]
        for other, c in against_rows:
            for dname, d in [("(all)", c["overall"]), *c["domains"].items()]:
                mark = " *" if supports_claim(d) else ""
                lines.append(f"{other:<{w}}{dname:<16}{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{mark}")
                other = ""
    for name, r in rows:
        for task, metrics in r.get("tasks", {}).items():
            if "missing" in metrics:
                lines.append(f"{name:<{width}}{task}: missing ({metrics['missing']})")
            else:
                lines.append(f"{name:<{width}}{task}: " + ", ".join(
                    f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items()))
    if results.get("verdicts"):
        lines += [""] + results["verdicts"]
    if results.get("scaling"):
        from megatron_miniplm.evaluation.sweep import lines as sweep_lines

        lines += [""] + sweep_lines(results["scaling"])
    return "\n".join(lines)
