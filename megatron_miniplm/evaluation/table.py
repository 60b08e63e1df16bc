"""The comparison table that tools/evaluate.py and the pipeline print."""

from __future__ import annotations


def format_table(results: dict) -> str:
    """LM loss (mean over instances of the per-instance mean NLL), token-weighted loss,
    perplexity, counts and training FLOPs (where the checkpoint records them: compute
    including a Vanilla KD teacher's forward passes) per model; then zero-shot metrics."""
    rows = list(results.items())
    width = max([24] + [len(name) + 2 for name, _ in rows])
    lines = []
    flops = any(r.get("train_flops") for _, r in rows)
    if any("lm_loss" in r for _, r in rows):
        lines.append(f"{'model':<{width}}{'LM loss':>10}{'token loss':>12}{'ppl':>10}{'instances':>11}{'tokens':>10}"
                     + (f"{'train FLOPs':>13}" if flops else ""))
        for name, r in rows:
            if "lm_loss" in r:
                lines.append(f"{name:<{width}}{r['lm_loss']:>10.4f}{r['token_weighted_loss']:>12.4f}"
                             f"{r['perplexity']:>10.2f}{r['instances']:>11}{r['tokens']:>10}"
                             + (f"{r['train_flops']:>13.3g}" if r.get("train_flops") else "") )
    for name, r in rows:
        for task, metrics in r.get("tasks", {}).items():
            lines.append(f"{name:<{width}}{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return "\n".join(lines)
