#!/usr/bin/env python
"""Difference Sampling: keep the instances a large teacher models well and a small
reference does not, and write them as a sampled blend for tools/pretrain_gpt.py.

    python tools/difference_sample.py --data-path PREFIX [PREFIX ...] \\
        --teacher-scores T [T ...] --reference-scores R [R ...] \\
        --alpha 0.5 | --keep-tokens N  --output BLEND_PREFIX \\
        [--method difference|uniform|teacher|reference] [--order original|shuffled] [--seed S] \\
        [--report DIR] [--materialize]

Score files come one per dataset shard, in shard order. The blend (BLEND_PREFIX.npy +
.meta.json) indexes the corpus in place; --materialize writes the selected instances as
a new indexed dataset instead. Nothing is written if any check fails.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_miniplm.selection.difference import METHODS, ORDERS, SelectionConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True, metavar="PREFIX",
                   help="dataset prefixes (a sharded dataset's top-level prefix expands to its shards)")
    g.add_argument("--teacher-scores", nargs="+", metavar="T", help="teacher score files, one per shard")
    g.add_argument("--reference-scores", nargs="+", metavar="R", help="reference score files, one per shard")
    g = p.add_argument_group("selection")
    g.add_argument("--method", choices=METHODS, default="difference",
                   help="difference (MiniPLM), or a baseline: uniform random, teacher (lowest teacher NLL), "
                        "reference (highest reference NLL)")
    budget = g.add_mutually_exclusive_group(required=True)
    budget.add_argument("--alpha", type=float, help="fraction of instances to keep, in (0, 1]")
    budget.add_argument("--keep-tokens", type=int, help="token budget: the best instances whose total fits")
    g.add_argument("--order", choices=ORDERS, default="original", help="order of the blend's instances")
    g.add_argument("--seed", type=int, default=1234, help="seed of the shuffled order and the uniform baseline")
    g.add_argument("--num-threads", type=int, default=0, help="C++ worker threads (0: all cores)")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, metavar="BLEND_PREFIX", help="writes BLEND_PREFIX.npy + .meta.json")
    g.add_argument("--materialize", action="store_true",
                   help="write the selected instances as a new indexed dataset at --output instead of a blend")
    g.add_argument("--report", metavar="DIR", help="write a selection report (tables, histograms, examples)")
    g.add_argument("--report-examples", type=int, default=5, help="top and bottom instances shown in the report")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_miniplm.selection.sample import SampleRequest, run

    try:
        cfg = SelectionConfig(method=args.method, alpha=args.alpha, keep_tokens=args.keep_tokens,
                              order=args.order, seed=args.seed, num_threads=args.num_threads)
        result = run(SampleRequest(
            data_paths=args.data_path, output=args.output, config=cfg, teacher_scores=args.teacher_scores,
            reference_scores=args.reference_scores, report_dir=args.report, report_examples=args.report_examples,
            materialize=args.materialize))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = result.meta
    sel = m.get("selection", m)
    what = "dataset" if args.materialize else "blend"
    print(f"{sel['method']}: kept {sel['num_selected']:,} of {sel['num_instances_total']:,} instances, "
          f"{sel['tokens_kept']:,} of {sel['tokens_total']:,} tokens -> {what} {args.output}")
    print("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    if args.report:
        print(f"report: {os.path.join(args.report, 'selection_report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
