"""Difference Sampling: keep the instances a large teacher models well and a small
reference does not, and write them as a sampled blend for tools/pretrain_gpt.py.

    python tools/difference_sample.py --data-path PREFIX [PREFIX ...] \\
        --teacher-scores T [T ...] --reference-scores R [R ...] \\
        --alpha 0.5 | --keep-tokens N  --output-prefix BLEND_PREFIX \\
        [--method difference|uniform|teacher|reference] [--data-order original|shuffled] [--seed S] \\
        [--report DIR] [--materialize]

Score files come one per dataset shard, in shard order. The blend (BLEND_PREFIX.npy +
.meta.json) indexes the corpus in place; --materialize writes the selected instances as
a new indexed dataset instead. Nothing is written if any check fails (exit 1, with the
reason).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_miniplm.cli import runner
from megatron_miniplm.cli.runner import tool


def build_parser() -> argparse.ArgumentParser:
    from megatron_miniplm.selection.sample import SampleRequest

    return runner.parser(__doc__, SampleRequest)


@tool
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_miniplm.selection.sample import SampleRequest, run
    from megatron_miniplm.settings import from_args

    from megatron_miniplm.locking import hold_output

    request = from_args(SampleRequest, args)
    hold_output(request.output, f"--output-prefix {request.output}")
    if request.report_dir:
        hold_output(request.report_dir, f"--report {request.report_dir}")
    result = run(request)
    m = result.meta
    sel = m.get("selection", m)
    what = "dataset" if request.materialize else "blend"
    print(f"{sel['method']}: kept {sel['num_selected']:,} of {sel['num_instances_total']:,} instances, "
          f"{sel['tokens_kept']:,} of {sel['tokens_total']:,} tokens -> {what} {request.output}")
    print("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    if request.report_dir:
        print(f"report: {os.path.join(request.report_dir, 'selection_report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
