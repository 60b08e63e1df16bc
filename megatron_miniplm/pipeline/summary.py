"""What a finished pipeline prints: the comparison table, the selection by domain, paths."""

from __future__ import annotations

import json
import os

from megatron_miniplm.evaluation.table import format_table
from megatron_miniplm.pipeline.stages import Graph


def print_summary(graph: Graph, *, table: bool = True) -> None:
    """``table``: print the LM-loss table (tools/evaluate.py printed it when it ran now)."""
    evaluate, select = graph["evaluate"], graph["select"]
    results_path = os.path.join(graph.out_dir(evaluate), "results.json")
    report = os.path.join(graph.out_dir(select), "report", "selection_report.md")
    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    print(f"\nHeld-out LM loss (teacher: {graph.teacher_label()}): {results_path}")
    if table:
        print(format_table(results))
    for key, what in (("report", "Evaluation report"), ("curves", "Validation loss curves")):
        if results.get(key):
            print(f"{what}: {results[key]}")
    if results.get("scaling", {}).get("plot"):
        print(f"Loss against training FLOPs (points, fits, bands): {results['scaling']['plot']}")
    if os.path.exists(report):
        print(f"\nSelection: kept fraction per domain ({report})")
        with open(report, encoding="utf-8") as f:
            section = f.read().split("## Per domain", 1)[-1].split("## Score", 1)[0]
        print("\n".join(line for line in section.splitlines() if line.startswith("|")))
    print(f"\nResolved config: {os.path.join(os.path.abspath(graph.cfg.work_dir), 'pipeline_config.yaml')}")
