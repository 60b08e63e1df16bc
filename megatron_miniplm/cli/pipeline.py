"""The whole MiniPLM pipeline from one config: corpus -> teacher import -> preprocess ->
D_ref split -> reference LM -> scores -> Difference Sampling (+ baselines of the same token
budget) -> students (same steps, seed) -> held-out comparison.

    python tools/pipeline.py [CONFIG.yaml] [key=value ...] [--dry-run]
    bash examples/pretrain_miniplm.sh [CONFIG.yaml] [key=value ...] [--dry-run]

Without a config file it runs the CPU demo (the defaults). Keys are dotted paths into
the config (selection.alpha=0.3, student.model.preset=qwen-200M, parallel.nproc_per_node=8);
the environment variables examples/pretrain_miniplm.sh reads (ALPHA, TEACHER,
SEQ_LENGTH, NNODES, ...) still work and lose to key=value. A finished stage is skipped
when what it was made with is unchanged; a changed stage reruns with everything after it.
--dry-run prints the resolved config and what would run or be skipped, and why, and
writes nothing. Exit status: 0 done, 1 a stage or the config failed (the reason is
printed), 3 a stage was stopped by SIGTERM after saving (run the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_miniplm.cli.runner import tool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="a YAML config file (first), then overrides")
    p.add_argument("--dry-run", action="store_true", help="print the config and the plan; run nothing")
    p.add_argument("--status", action="store_true",
                   help="where the run of this config stands (from any node, during the run or after it "
                        "stopped): each stage's state, a running training stage's iteration, speed and time "
                        "left; runs nothing")
    return p


def status_report(graph) -> str:
    """The --status table: the output directories a stage reads come from their records."""
    from megatron_miniplm.pipeline import runner, status

    work_dir = os.path.abspath(graph.cfg.work_dir)

    def dirs_of(stage):
        return {dep: (runner.read_record(work_dir, dep) or {}).get("output", graph.out_dir(graph[dep]))
                for dep in stage.deps}

    return status.report(graph, dirs_of)


@tool
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    path = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    overrides = ns.args[1:] if path else ns.args

    from megatron_miniplm.pipeline import config, invariants, runner, stages
    from megatron_miniplm.pipeline.summary import print_summary

    cfg, sources = config.load(path, overrides)  # a refused config (ConfigError, a ValueError): status 1
    graph = stages.Graph(cfg)
    if ns.status:  # also where the config can no longer run (e.g. outside the Slurm job that ran it)
        print(status_report(graph))
        return 0
    invariants.check(graph, sources)
    decisions = runner.plan(graph)
    if ns.dry_run:
        print(runner.describe(graph, decisions, sources))
        return 0
    print(f"bf16: {str(graph.bf16).lower()} ({graph.bf16_reason})")
    code = runner.execute(graph, decisions)
    if code == 0 and cfg.parallel.node_rank == 0:
        print_summary(graph, table=not any(d.run for d in decisions if d.stage.name == "evaluate"))
    return code


if __name__ == "__main__":
    sys.exit(main())
