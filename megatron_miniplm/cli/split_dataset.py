"""Carve D_ref (the reference model's training data) out of a preprocessed dataset.

    python tools/split_dataset.py --input-prefix out/pile --ref-prefix out/pile_ref \\
        --rest-prefix out/pile_rest --ref-tokens 5000000000 --seed 1234

A deterministic random subset of instances (a fraction of the instances, or at least a
number of tokens; the paper reserves 5B of 105B tokens) goes to --ref-prefix, all others
to --rest-prefix. Both are complete datasets (bin/idx/domains.npy/meta.json) in input
order; PREFIX.source_index.npy gives each instance's index in the input dataset.
"""
from __future__ import annotations

import argparse
import sys

from megatron_miniplm.cli import runner
from megatron_miniplm.cli.runner import tool
from megatron_miniplm.data.cli import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from megatron_miniplm.data.config import SplitConfig

    return runner.parser(__doc__, SplitConfig)


@tool
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from megatron_miniplm.data.split import split_dataset
    from megatron_miniplm.data.config import SplitConfig
    from megatron_miniplm.locking import hold_output
    from megatron_miniplm.settings import from_args

    config = from_args(SplitConfig, args)
    for flag, prefix in (("--ref-prefix", config.ref_prefix), ("--rest-prefix", config.rest_prefix)):
        hold_output(prefix, f"{flag} {prefix}")
    return run_stage(split_dataset, config)


if __name__ == "__main__":
    sys.exit(main())
