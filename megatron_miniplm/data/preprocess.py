"""The preprocessing pipeline: JSONL, Parquet or `datasets` inputs -> MiniPLM instances
in a Megatron dataset.

    main thread: read + decompress + hash --blocks--> worker threads: parse + tokenize
    main thread: <--token arrays, in input order-- ; build instances ; write

The main thread hands out blocks of about 1 MB of complete lines (JSONL) or of the texts
of consecutive rows (Parquet row groups and `datasets` record batches, read one at a time
and validated by data/arrow_reader.py; the workers only tokenize them) and consumes the
results strictly in input order, with a bounded number in flight. Memory therefore
depends on the block size (and a Parquet file's row-group size), the worker count and the
longest document, not on the corpus, and the output bytes do not depend on the number of
workers, nor on the input format: the same documents from JSONL, Parquet (any row-group
size) or a `datasets` directory give the same dataset.

Why threads and not processes: the encoders release the GIL, and threads share one
tokenizer, hence one BPE word cache. Measured on 2 cores, worker processes (each with its
own cache) needed ~1.3x the CPU of the library's own batch encoding; threads ~1.0x.
HF tokenizers also parallelize inside each batch with their Rust thread pool, which
tools/preprocess_data.py sizes to --workers (RAYON_NUM_THREADS, read once per process).
GPT-2-style byte-level BPE tokenizer.json files are encoded by the native encoder of
data/fast_bpe.py instead (the same ids; one word cache per concurrent batch, GIL released).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from megatron_miniplm.data.arrow_reader import RecordBlock
from megatron_miniplm.data.boundaries import BoundaryTables
from megatron_miniplm.data.dataset_writer import DatasetWriter
from megatron_miniplm.data.instances import InstanceBuilder, InstanceMode
from megatron_miniplm.data.jsonl_reader import (
    ARROW_FORMATS, Block, FileDone, ReadFailure, compression_of, input_bytes, read_blocks, resolve_inputs,
)
from megatron_miniplm.data.meta import FORMAT_VERSION
from megatron_miniplm.data.records import BadRecord, InputError, SkipReason, parse_key
from megatron_miniplm.data.tokenizer import load_tokenizer
from megatron_miniplm.data.worker import BlockTokenizer, TokenizedBlock, WorkerConfig
from megatron_miniplm.settings import setting

log = logging.getLogger(__name__)

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
        "miniplm", group="instances", choices=[m.value for m in InstanceMode],
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
    log_skipped: int = setting(10, group="runtime", help="log the first N skipped records with file:line")

    def validate(self) -> None:
        InstanceMode(self.instance_mode)
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
class InputStats:
    path: str
    sha256: str = ""
    bytes: int = 0
    lines: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_meta(self) -> dict:
        return {
            "path": self.path, "sha256": self.sha256, "bytes": self.bytes, "lines": self.lines,
            "documents": self.documents, "skipped": dict(sorted(self.skipped.items())),
        }


@dataclass
class PreprocessSummary:
    meta: dict  # the (top-level) meta.json written
    output_prefix: str
    seconds: float
    text_bytes: int  # decompressed JSONL bytes; for Parquet/datasets inputs, their text values' bytes
    raw_bytes: int  # bytes read from disk
    documents: int
    lines: int  # JSONL lines and Parquet/datasets rows
    formats: str = "jsonl"  # the inputs: "jsonl", "arrow" (Parquet/datasets) or "mixed"

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def format(self) -> str:
        m, s = self.meta, max(self.seconds, 1e-9)
        skipped = {k: v for k, v in m["skipped"].items() if v}
        units, text = {"jsonl": ("lines", "JSONL"), "arrow": ("rows", "text"),
                       "mixed": ("lines and rows", "JSONL and text")}[self.formats]
        lines = [
            f"read {len(m['inputs'])} file(s): {self.lines:,} {units}, {self.text_bytes / 1e6:,.1f} MB of {text} "
            f"({self.raw_bytes / 1e6:,.1f} MB on disk) in {self.seconds:.1f} s",
            f"throughput: {self.mb_per_s:.2f} MB/s, {self.documents / s:,.0f} docs/s, "
            f"{m['num_tokens'] / s / 1e6:.2f}M tokens/s",
            f"documents: {self.documents:,}; skipped: {sum(skipped.values()):,}"
            + (" (" + ", ".join(f"{k} {v:,}" for k, v in skipped.items()) + ")" if skipped else ""),
            f"instances: {m['num_instances']:,} ({m['instance_mode']}, seq_length {m['seq_length']}, "
            f"{m['dtype']}), tokens: {m['num_tokens']:,}",
        ]
        width = max([len("domain")] + [len(d) for d in m["domains"]])
        lines.append(f"  {'domain':<{width}} {'documents':>12} {'instances':>12} {'tokens':>15}")
        for name, st in m["domain_stats"].items():
            lines.append(f"  {name:<{width}} {st['documents']:>12,} {st['instances']:>12,} {st['tokens']:>15,}")
        where = f"{len(m['shards'])} shards {self.output_prefix}_NNNNN.*" if "shards" in m else f"{self.output_prefix}.*"
        lines.append(f"wrote {where} and {self.output_prefix}.meta.json (fingerprint {m['fingerprint'][:16]})")
        return "\n".join(lines)


def ordered_tokenize(items: Iterable, workers: int, tokenize: BlockTokenizer, max_pending: int) -> Iterator:
    """`tokenize` over the Blocks and RecordBlocks of `items` in `workers` threads, other items passed
    through, all in input order. At most `max_pending` blocks are in flight, which bounds
    memory (Pool.imap, by contrast, reads its whole input ahead)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(tokenize, item) if isinstance(item, (Block, RecordBlock)) else item)
                while pending and (len(pending) > max_pending or not isinstance(pending[0], Future)):
                    head = pending.popleft()
                    yield head.result() if isinstance(head, Future) else head
            while pending:
                head = pending.popleft()
                yield head.result() if isinstance(head, Future) else head
        finally:
            for f in pending:  # stopped early (an error): drop the queued blocks
                if isinstance(f, Future):
                    f.cancel()


class _Progress:
    """tqdm over input bytes on disk, with docs/s, MB/s of JSONL (Parquet/datasets: of text) and tokens/s."""

    def __init__(self, total: int, enabled: bool):
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", dynamic_ncols=True)
        self.done_files = 0  # raw bytes of finished files
        self.shown = 0

    def update(self, raw_pos: int, docs: int, text_bytes: int, tokens: int) -> None:
        if self.bar is None:
            return
        pos = self.done_files + raw_pos
        el = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{docs / el:,.0f} docs/s, {text_bytes / el / 1e6:.2f} MB/s, {tokens / el / 1e6:.2f}M tok/s", refresh=False
        )
        self.bar.update(pos - self.shown)
        self.shown = pos

    def file_done(self, raw_bytes: int) -> None:
        self.done_files += raw_bytes
        if self.bar is not None and self.done_files > self.shown:  # Parquet: its footer is never a block's raw_pos
            self.bar.update(self.done_files - self.shown)
            self.shown = self.done_files

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Run the pipeline; on any error nothing is left under the output prefix."""
    config.validate()
    start = time.perf_counter()
    paths = resolve_inputs(config.inputs)
    row_based = [compression_of(p) in ARROW_FORMATS for p in paths]  # errors name rows, not lines
    tokenizer = load_tokenizer(config.tokenizer, config.eod_token)
    mode = InstanceMode(config.instance_mode)
    tables = BoundaryTables.from_tokenizer(tokenizer) if mode is InstanceMode.MINIPLM else None
    worker_config = WorkerConfig(
        tokenizer_path=config.tokenizer,
        eod_token=config.eod_token,
        text_key=parse_key(config.json_key),
        domain_key=parse_key(config.domain_key),
        stop_at_first_error=config.on_error == "fail",
        tables=tables,
    )
    tokenize = BlockTokenizer(worker_config, tokenizer)
    builder = InstanceBuilder(mode, config.seq_length)
    inputs = [InputStats(os.path.abspath(p)) for p in paths]
    skipped: Counter = Counter()
    domains: dict[str, int] = {}
    docs = text_bytes = tokens = 0
    progress = _Progress(sum(input_bytes(p) for p in paths), config.progress)

    def reject(file_index: int, record: BadRecord) -> None:
        if config.on_error == "fail":
            raise InputError(paths[file_index], record, row_based[file_index])
        skipped[record.reason] += 1
        inputs[file_index].skipped[record.reason.value] += 1
        if sum(skipped.values()) <= config.log_skipped:
            log.warning("skipped %s", InputError(paths[file_index], record, row_based[file_index]))

    def domain_id(name: str, file_index: int) -> int:
        if name not in domains:
            if len(domains) >= config.max_domains:
                raise ValueError(
                    f"{paths[file_index]}: more than {config.max_domains} distinct domains (new: {name!r}); "
                    "check --domain-key, or raise --max-domains"
                )
            domains[name] = len(domains)
        return domains[name]

    try:
        blocks = read_blocks(paths, config.block_bytes, worker_config.text_key, worker_config.domain_key)
        in_flight = 2 * config.workers + 1
        with DatasetWriter(config.output_prefix, tokenizer.vocab_size, tokenizer.eod_id, config.shard_size_tokens) as writer, \
                closing(ordered_tokenize(blocks, config.workers, tokenize, in_flight)) as items:
            for item in items:
                if isinstance(item, FileDone):
                    st = inputs[item.file_index]
                    st.sha256, st.bytes, st.lines = item.sha256, item.raw_bytes, item.lines
                    progress.file_done(item.raw_bytes)
                    continue
                if isinstance(item, ReadFailure):
                    reject(item.file_index, item.record)
                    continue
                block: TokenizedBlock = item
                for bad in block.bad:
                    reject(block.file_index, bad)
                ends = np.cumsum(block.doc_lengths)
                for i, name in enumerate(block.domains):
                    lo, hi = (int(ends[i - 1]) if i else 0), int(ends[i])
                    flags = block.flags[lo:hi] if block.flags is not None else None
                    builder.add(block.tokens[lo:hi], domain_id(name, block.file_index), flags)
                writer.add(builder.take())
                inputs[block.file_index].documents += len(block.domains)
                docs += len(block.domains)
                text_bytes += block.text_bytes
                tokens += len(block.tokens)
                progress.update(block.raw_pos, docs, text_bytes, tokens)
            writer.add(builder.flush())
            if docs == 0:
                raise ValueError(f"no usable documents in {', '.join(paths)}")
            common = {
                "format_version": FORMAT_VERSION,
                "instance_mode": mode.value,
                "seq_length": config.seq_length,
                "dtype": np.dtype(writer.dtype).name,
                "tokenizer": tokenizer.info(),
                "boundary_tokens": tables.summary() if tables is not None else None,
                "json_key": config.json_key,
                "domain_key": config.domain_key,
                "on_error": config.on_error,
                "inputs": [st.to_meta() for st in inputs],
                "skipped": {r.value: skipped[r] for r in SkipReason},
            }
            meta = writer.commit(common, list(domains))
    finally:
        progress.close()
    return PreprocessSummary(
        meta=meta,
        output_prefix=config.output_prefix,
        seconds=time.perf_counter() - start,
        text_bytes=text_bytes,
        raw_bytes=sum(st.bytes for st in inputs),
        documents=docs,
        lines=sum(st.lines for st in inputs),
        formats="jsonl" if not any(row_based) else "arrow" if all(row_based) else "mixed",
    )
