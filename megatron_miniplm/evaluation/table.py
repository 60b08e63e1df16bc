"""The comparison table that tools/evaluate.py and the pipeline print."""

from __future__ import annotations


def format_table(results: dict) -> str:
    """LM loss (mean over instances of the per-instance mean NLL), token-weighted loss,
    perplexity and counts per model; then each model's zero-shot task metrics."""
    rows = list(results.items())
    width = max([24] + [len(name) + 2 for name, _ in rows])
    lines = []
    if any("lm_loss" in r for _, r in rows):
        lines.append(f"{'model':<{width}}{'LM loss':>10}{'token loss':>12}{'ppl':>10}{'instances':>11}{'tokens':>10}")
        for name, r in rows:
            if "lm_loss" in r:
                lines.append(f"{name:<{width}}{r['lm_loss']:>10.4f}{r['token_weighted_loss']:>12.4f}"
                             f"{r['perplexity']:>10.2f}{r['instances']:>11}{r['tokens']:>10}")
    for name, r in rows:
        for task, metrics in r.get("tasks", {}).items():
            lines.append(f"{name:<{width}}{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return "\n".join(lines)
