"""Tokenize Pile-style JSONL into Megatron indexed datasets of MiniPLM instances.

    python tools/preprocess_data.py --input 'data/*.jsonl.zst' --output-prefix out/pile \\
        --tokenizer qwen/tokenizer.json --seq-length 1024 --workers 16

Inputs: .jsonl (.json, .ndjson), optionally .gz or .zst; .parquet files, read a row group
at a time; directories written by HF datasets' Dataset.save_to_disk (Arrow IPC streams),
read a record batch at a time; mixed in one run, read in argument order. --json-key and
--domain-key name JSON keys or columns (dotted: fields of nested objects or struct
columns); the same documents give the same dataset whatever their format.

Writes PREFIX.bin/.idx (megatron-core IndexedDataset), PREFIX.domains.npy and
PREFIX.meta.json (or PREFIX_00000.* ... with --shard-size-tokens), all under temporary
names renamed at the end: a failed run leaves nothing under PREFIX. Exit status 1 on bad
input (with --on-error fail) or bad arguments, with the file, line (or row) and reason, and
on a full disk, with the file and the space. A second preprocess_data on the same
--output-prefix is refused at once, naming the one running (PREFIX.lock).
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_miniplm.cli import runner
from megatron_miniplm.cli.runner import tool
from megatron_miniplm.data.cli import run_stage, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from megatron_miniplm.data.config import PreprocessConfig

    return runner.parser(__doc__, PreprocessConfig)


@tool
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # HF tokenizers' Rust thread pool reads its size once, at its first use.
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, args.workers)))
    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.data.config import PreprocessConfig
    from megatron_miniplm.settings import from_args

    from megatron_miniplm.locking import hold_output

    hold_output(args.output_prefix, f"--output-prefix {args.output_prefix}")
    return run_stage(preprocess, from_args(PreprocessConfig, args))  # bad input: status 1


if __name__ == "__main__":
    sys.exit(main())
