#!/usr/bin/env python3
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

from megatron_miniplm.data.cli import run_stage, setup_logging


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-prefix", required=True, help="dataset written by tools/preprocess_data.py (sharded or not)")
    p.add_argument("--ref-prefix", required=True, help="output: D_ref")
    p.add_argument("--rest-prefix", required=True, help="output: every other instance")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--ref-fraction", type=float, help="fraction of the instances that go to D_ref, in (0, 1)")
    size.add_argument("--ref-tokens", type=int, help="D_ref gets the fewest random instances holding this many tokens")
    p.add_argument("--seed", type=int, default=1234, help="the same seed gives the same split")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging()
    from megatron_miniplm.data.split import SplitConfig, split_dataset

    config = SplitConfig(args.input_prefix, args.ref_prefix, args.rest_prefix,
                         ref_fraction=args.ref_fraction, ref_tokens=args.ref_tokens, seed=args.seed)
    return run_stage(split_dataset, config)


if __name__ == "__main__":
    sys.exit(main())
