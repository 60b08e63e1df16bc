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
size) or a `datasets` directory give the same dataset. data/inputs.py resolves the inputs
and reads each with its format's reader; a `Preprocessor` runs the rest, in set-up, loop
and finalisation steps.

Why threads and not processes: the encoders release the GIL, and threads share one
tokenizer, hence one BPE word cache; worker processes each warm their own cache and cost
more CPU (benchmarks/RESULTS.md, "Preprocessing", has the measurements).
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

from megatron_miniplm.data.blocks import Block, FileDone, ReadFailure, RecordBlock
from megatron_miniplm.data.boundaries import BoundaryTables
from megatron_miniplm.data.dataset_writer import DatasetWriter
from megatron_miniplm.data.inputs import ARROW_FORMATS, compression_of, input_bytes, read_blocks, resolve_inputs
from megatron_miniplm.data.instances import InstanceBuilder, InstanceMode
from megatron_miniplm.data.meta import FORMAT_VERSION
from megatron_miniplm.data.records import BadRecord, InputError, SkipReason, parse_key
from megatron_miniplm.data.tokenizer import load_tokenizer
from megatron_miniplm.data.worker import BlockTokenizer, TokenizedBlock, WorkerConfig
from megatron_miniplm.data.config import PreprocessConfig

log = logging.getLogger(__name__)


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


class Preprocessor:
    """One run of the pipeline, in three steps: set-up (`__init__`: settings, inputs,
    tokenizer, instance builder, progress bar), the loop (`_consume`: every input's
    blocks, tokenized in input order, into instances) and finalisation (`_finish`: the
    last instances and the meta, committed). `run` holds the output's writer around the
    last two, so that on any error nothing is left under the output prefix."""

    def __init__(self, config: PreprocessConfig):
        config.validate()
        self.config = config
        self.start = time.perf_counter()
        self.paths = resolve_inputs(config.inputs)
        self.row_based = [compression_of(p) in ARROW_FORMATS for p in self.paths]  # errors name rows, not lines
        self.tokenizer = load_tokenizer(config.tokenizer, config.eod_token)
        self.mode = InstanceMode(config.instance_mode)
        self.tables = BoundaryTables.from_tokenizer(self.tokenizer) if self.mode is InstanceMode.MINIPLM else None
        self.worker_config = WorkerConfig(
            tokenizer_path=config.tokenizer,
            eod_token=config.eod_token,
            text_key=parse_key(config.json_key),
            domain_key=parse_key(config.domain_key),
            stop_at_first_error=config.on_error == "fail",
            tables=self.tables,
        )
        self.tokenize = BlockTokenizer(self.worker_config, self.tokenizer)
        self.builder = InstanceBuilder(self.mode, config.seq_length, self.tokenizer.eod_id)
        self.inputs = [InputStats(os.path.abspath(p)) for p in self.paths]
        self.skipped: Counter = Counter()
        self.domains: dict[str, int] = {}
        self.docs = self.text_bytes = self.tokens = 0
        self.progress = _Progress(sum(input_bytes(p) for p in self.paths), config.progress)

    def run(self) -> PreprocessSummary:
        config, tokenizer = self.config, self.tokenizer
        try:
            with DatasetWriter(config.output_prefix, tokenizer.vocab_size, tokenizer.eod_id,
                               config.shard_size_tokens) as writer:
                self._consume(writer)
                meta = self._finish(writer)
        finally:
            self.progress.close()
        return self._summary(meta)

    # ---- the loop --------------------------------------------------------------------------
    def _consume(self, writer: DatasetWriter) -> None:
        config, keys = self.config, (self.worker_config.text_key, self.worker_config.domain_key)
        blocks = read_blocks(self.paths, config.block_bytes, *keys)
        in_flight = 2 * config.workers + 1
        with closing(ordered_tokenize(blocks, config.workers, self.tokenize, in_flight)) as items:
            for item in items:
                if isinstance(item, FileDone):
                    self._file_done(item)
                elif isinstance(item, ReadFailure):
                    self._reject(item.file_index, item.record)
                else:
                    self._add_block(item, writer)

    def _add_block(self, block: TokenizedBlock, writer: DatasetWriter) -> None:
        for bad in block.bad:
            self._reject(block.file_index, bad)
        ends = np.cumsum(block.doc_lengths)
        for i, name in enumerate(block.domains):
            lo, hi = (int(ends[i - 1]) if i else 0), int(ends[i])
            flags = block.flags[lo:hi] if block.flags is not None else None
            self.builder.add(block.tokens[lo:hi], self._domain_id(name, block.file_index), flags)
        writer.add(self.builder.take())
        self.inputs[block.file_index].documents += len(block.domains)
        self.docs += len(block.domains)
        self.text_bytes += block.text_bytes
        self.tokens += len(block.tokens)
        self.progress.update(block.raw_pos, self.docs, self.text_bytes, self.tokens)

    def _file_done(self, done: FileDone) -> None:
        st = self.inputs[done.file_index]
        st.sha256, st.bytes, st.lines = done.sha256, done.raw_bytes, done.lines
        self.progress.file_done(done.raw_bytes)

    def _reject(self, file_index: int, record: BadRecord) -> None:
        """Apply --on-error to a bad record: raise, or count it (and log the first few)."""
        if self.config.on_error == "fail":
            raise self._error(file_index, record)
        self.skipped[record.reason] += 1
        self.inputs[file_index].skipped[record.reason.value] += 1
        if sum(self.skipped.values()) <= self.config.log_skipped:
            log.warning("skipped %s", self._error(file_index, record))

    def _error(self, file_index: int, record: BadRecord) -> InputError:
        # Built only when raised or logged: a skip run may count millions of records.
        return InputError(self.paths[file_index], record, self.row_based[file_index])

    def _domain_id(self, name: str, file_index: int) -> int:
        if name not in self.domains:
            if len(self.domains) >= self.config.max_domains:
                raise ValueError(
                    f"{self.paths[file_index]}: more than {self.config.max_domains} distinct domains (new: {name!r}); "
                    "check --domain-key, or raise --max-domains"
                )
            self.domains[name] = len(self.domains)
        return self.domains[name]

    # ---- finalisation ----------------------------------------------------------------------
    def _finish(self, writer: DatasetWriter) -> dict:
        """Write the last instances and commit the dataset; returns the meta written."""
        config = self.config
        writer.add(self.builder.flush())
        if self.docs == 0:
            raise ValueError(f"no usable documents in {', '.join(self.paths)}")
        common = {
            "format_version": FORMAT_VERSION,
            "instance_mode": self.mode.value,
            "seq_length": config.seq_length,
            "dtype": np.dtype(writer.dtype).name,
            "tokenizer": self.tokenizer.info(),
            "boundary_tokens": self.tables.summary() if self.tables is not None else None,
            "json_key": config.json_key,
            "domain_key": config.domain_key,
            "on_error": config.on_error,
            "inputs": [st.to_meta() for st in self.inputs],
            "skipped": {r.value: self.skipped[r] for r in SkipReason},
        }
        return writer.commit(common, list(self.domains))

    def _summary(self, meta: dict) -> PreprocessSummary:
        return PreprocessSummary(
            meta=meta,
            output_prefix=self.config.output_prefix,
            seconds=time.perf_counter() - self.start,
            text_bytes=self.text_bytes,
            raw_bytes=sum(st.bytes for st in self.inputs),
            documents=self.docs,
            lines=sum(st.lines for st in self.inputs),
            formats="jsonl" if not any(self.row_based) else "arrow" if all(self.row_based) else "mixed",
        )


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Run the pipeline; on any error nothing is left under the output prefix."""
    return Preprocessor(config).run()
