"""The settings of preprocessing and of the D_ref split: tools/preprocess_data.py's and
tools/split_dataset.py's flags (a config module: no numpy, no torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_miniplm.settings import setting

INSTANCE_MODES = ("miniplm", "packed", "document")  # data/instances.py's InstanceMode


ON_ERROR = ("fail", "skip")
@dataclass
class PreprocessConfig:
    """A preprocessing run; its settings are tools/preprocess_data.py's flags."""

    inputs: list[str] = setting(group="input", flag="--input", metavar="FILE_OR_GLOB",
                                help=".jsonl, .jsonl.gz or .jsonl.zst files, .parquet files (read a row group at "
                                     "a time), datasets save_to_disk directories, or globs of these (quote globs); "
                                     "read in order, formats may be mixed")
    output_prefix: str = setting(group="output", help="PREFIX of PREFIX.bin/.idx/.domains.npy/.meta.json")
    tokenizer: str = setting(group="tokenizer", metavar="PATH",
                             help="HF tokenizer.json (or a directory holding one) or a sentencepiece .model")
    seq_length: int = setting(1024, group="instances", help="instances hold at most seq-length+1 tokens")
    workers: int = setting(1, group="runtime",
                           help="tokenizer threads (and the size of HF tokenizers' Rust thread pool); "
                                "the output does not depend on it")
    json_key: str = setting("text", group="input",
                            help="key (Parquet/datasets: column) of the document text; dotted for nested keys "
                                 "(struct fields), a key or column literally named with the dots wins")
    domain_key: str = setting("meta.pile_set_name", group="input",
                              help="key (Parquet/datasets: column) of the domain name, dotted as --json-key; '' "
                                   "puts everything in domain 'default'")
    instance_mode: str = setting(
        "miniplm", group="instances", choices=INSTANCE_MODES,
        help="miniplm: per-domain instances of <= seq-length+1 tokens cut at sentence boundaries; "
             "packed: fixed seq-length+1 cuts per domain; document: one record per document")
    on_error: str = setting("fail", group="input", choices=ON_ERROR,
                            help="bad input (invalid JSON or UTF-8, missing key or column, non-string, null or "
                                 "empty text, truncated .gz/.zst, unreadable Parquet/Arrow): stop with "
                                 "file:line:reason (file: row N: reason), or skip and count by reason")
    shard_size_tokens: int | None = setting(None, group="output",
                                            help="write shards PREFIX_00000, ... of at most this many tokens each")
    eod_token: str | None = setting(None, group="tokenizer",
                                    help="end-of-document token appended to every document (default: from "
                                         "the tokenizer, e.g. <|endoftext|>)")
    block_bytes: int = setting(1 << 20, group="runtime",
                               help="bytes of JSONL (Parquet/datasets: of text) handed to a worker at a time")
    max_domains: int = setting(4096, group="input", help="guard against a wrong --domain-key")
    progress: bool = setting(True, group="runtime", flag="--no-progress", help="no progress bar")
    log_skipped: int = setting(10, group="runtime", fingerprinted=False,
                               help="log the first N skipped records with file:line")

    def validate(self) -> None:
        if self.instance_mode not in INSTANCE_MODES:
            raise ValueError(f"instance_mode must be one of {INSTANCE_MODES}, got {self.instance_mode!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.json_key:
            raise ValueError("json_key must not be empty")
        if self.block_bytes < 1:
            raise ValueError(f"block_bytes must be >= 1, got {self.block_bytes}")


@dataclass
class SplitConfig:
    """A D_ref split; its settings are tools/split_dataset.py's flags."""

    input_prefix: str = setting(help="dataset written by tools/preprocess_data.py (sharded or not)")
    ref_prefix: str = setting(help="output: D_ref")
    rest_prefix: str = setting(help="output: every other instance")
    ref_fraction: float | None = setting(None, one_of="D_ref's size",
                                         help="fraction of the instances that go to D_ref, in (0, 1)")
    ref_tokens: int | None = setting(None, one_of="D_ref's size",
                                     help="or: D_ref gets the fewest random instances holding this many tokens")
    seed: int = setting(1234, help="the same seed gives the same split")
    chunk_instances: int = 1 << 20

    def validate(self) -> None:
        if (self.ref_fraction is None) == (self.ref_tokens is None):
            raise ValueError("give exactly one of ref_fraction and ref_tokens")
        if self.ref_fraction is not None and not 0 < self.ref_fraction < 1:
            raise ValueError(f"ref_fraction must be in (0, 1), got {self.ref_fraction}")
        if self.ref_tokens is not None and self.ref_tokens < 1:
            raise ValueError(f"ref_tokens must be >= 1, got {self.ref_tokens}")
        outs = {os.path.abspath(p) for p in (self.ref_prefix, self.rest_prefix)}
        if len(outs) < 2 or os.path.abspath(self.input_prefix) in outs:
            raise ValueError("input, ref and rest prefixes must be three different prefixes")
