#!/usr/bin/env python3
"""Tokenize Pile-style JSONL into Megatron indexed datasets of MiniPLM instances.

    python tools/preprocess_data.py --input 'data/*.jsonl.zst' --output-prefix out/pile \\
        --tokenizer qwen/tokenizer.json --seq-length 1024 --workers 16

Writes PREFIX.bin/.idx (megatron-core IndexedDataset), PREFIX.domains.npy and
PREFIX.meta.json (or PREFIX_00000.* ... with --shard-size-tokens), all under temporary
names renamed at the end: a failed run leaves nothing under PREFIX. Exit status 1 on bad
input (with --on-error fail) or bad arguments, with the file, line and reason.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_miniplm.data.cli import run_stage, setup_logging


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help=".jsonl, .jsonl.gz or .jsonl.zst files or globs (quote globs), read in order")
    g.add_argument("--json-key", default="text", help="key of the document text (dotted for nested keys)")
    g.add_argument("--domain-key", default="meta.pile_set_name",
                   help="key of the domain name (dotted for nested keys); '' puts everything in domain 'default'")
    g.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad input (invalid JSON or UTF-8, missing key, non-string or empty text, truncated "
                        ".gz/.zst): stop with file:line:reason, or skip and count by reason")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="HF tokenizer.json (or a directory holding one) or a sentencepiece .model")
    g.add_argument("--eod-token", default=None,
                   help="end-of-document token appended to every document (default: from the tokenizer, "
                        "e.g. <|endoftext|>)")
    g = p.add_argument_group("instances")
    g.add_argument("--instance-mode", choices=("miniplm", "packed", "document"), default="miniplm",
                   help="miniplm: per-domain instances of <= seq-length+1 tokens cut at sentence boundaries; "
                        "packed: fixed seq-length+1 cuts per domain; document: one record per document")
    g.add_argument("--seq-length", type=int, default=1024, help="instances hold at most seq-length+1 tokens")
    g.add_argument("--max-domains", type=int, default=4096, help="guard against a wrong --domain-key")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="PREFIX of PREFIX.bin/.idx/.domains.npy/.meta.json")
    g.add_argument("--shard-size-tokens", type=int, default=None,
                   help="write shards PREFIX_00000, ... of at most this many tokens each")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="tokenizer threads (and the size of HF tokenizers' Rust thread pool); "
                        "the output does not depend on it")
    g.add_argument("--block-size-mb", type=float, default=1.0, help="JSONL handed to a worker at a time")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log-skipped", type=int, default=10, help="log the first N skipped records")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging()
    # HF tokenizers' Rust thread pool reads its size once, at its first use.
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, args.workers)))
    from megatron_miniplm.data.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        seq_length=args.seq_length,
        workers=args.workers,
        json_key=args.json_key,
        domain_key=args.domain_key,
        instance_mode=args.instance_mode,
        on_error=args.on_error,
        shard_size_tokens=args.shard_size_tokens,
        eod_token=args.eod_token,
        block_bytes=max(1, int(args.block_size_mb * (1 << 20))),
        max_domains=args.max_domains,
        progress=not args.no_progress,
        log_skipped=args.log_skipped,
    )
    return run_stage(preprocess, config)  # InputError, TokenizerError, missing files...: status 1


if __name__ == "__main__":
    sys.exit(main())
