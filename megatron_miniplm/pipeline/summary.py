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
    # The figures' paths from this work directory's layout, not from results.json: a work
    # directory copied or moved names its own files.
    figures = os.path.join(graph.out_dir(evaluate), "report")
    for path, what in ((results.get("report"), "Evaluation report"), (results.get("curves"), "Validation loss curves"),
                       (results.get("scaling", {}).get("plot"), "Loss against training FLOPs (points, fits, bands)")):
        if path:
            print(f"{what}: {os.path.join(figures, os.path.basename(path))}")
    if os.path.exists(report):
        print(f"\nSelection: kept fraction per domain ({report})")
        with open(report, encoding="utf-8") as f:
            section = f.read().split("## Per domain", 1)[-1].split("## Score", 1)[0]
        print("\n".join(line for line in section.splitlines() if line.startswith("|")))
    print(f"\nResolved config: {os.path.join(os.path.abspath(graph.cfg.work_dir), 'pipeline_config.yaml')}")
