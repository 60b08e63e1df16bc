"""The parallel step of preprocessing: parse and tokenize one block of JSONL lines, or
tokenize the texts of a `RecordBlock` of Parquet/Arrow rows (validated by the reader).

`--workers` threads run it on consecutive blocks. The encoders (HF `tokenizers` in Rust,
sentencepiece in C++) release the GIL, so the threads encode in parallel while others
parse JSON. It never raises on bad input: bad lines come back as `BadRecord`s, for the
main thread to apply the --on-error policy in input order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_miniplm.data.blocks import Block, RecordBlock
from megatron_miniplm.data.boundaries import BoundaryTables
from megatron_miniplm.data.records import BadRecord, parse_block
from megatron_miniplm.data.tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class WorkerConfig:
    tokenizer_path: str
    eod_token: str | None
    text_key: tuple[str, ...]
    domain_key: tuple[str, ...] | None
    stop_at_first_error: bool
    tables: BoundaryTables | None  # None: no boundary flags needed (packed/document modes)


@dataclass
class TokenizedBlock:
    file_index: int
    first_line: int
    num_lines: int
    text_bytes: int
    raw_pos: int
    tokens: np.ndarray  # int32: every document's ids followed by EOD, concatenated
    doc_lengths: np.ndarray  # int64, EOD included
    domains: list[str]
    flags: np.ndarray | None  # bool per token: an instance may end after it
    bad: list[BadRecord] = field(default_factory=list)


class BlockTokenizer:
    """Parse and tokenize a block: safe to call from several threads at once (the
    tokenizers and sentencepiece encoders release the GIL and share one vocabulary and
    one BPE cache, which is why threads beat processes here)."""

    def __init__(self, config: WorkerConfig, tokenizer: Tokenizer | None = None):
        self.config = config
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer_path, config.eod_token)

    def __call__(self, block: Block | RecordBlock) -> TokenizedBlock:
        config, tokenizer = self.config, self.tokenizer
        if isinstance(block, RecordBlock):
            parsed, text_bytes = block, block.text_bytes
        else:
            parsed = parse_block(
                block.data, block.first_line, config.text_key, config.domain_key,
                stop_at_first_error=config.stop_at_first_error,
            )
            text_bytes = len(block.data)
        if parsed.texts:
            tokens, lengths = tokenizer.encode_batch_flat(parsed.texts, append_id=tokenizer.eod_id)
        else:
            tokens, lengths = np.zeros(0, np.int32), np.zeros(0, np.int64)
        flags = config.tables.flags(tokens) if config.tables is not None else None
        return TokenizedBlock(
            file_index=block.file_index,
            first_line=block.first_line,
            num_lines=block.num_lines,
            text_bytes=text_bytes,
            raw_pos=block.raw_pos,
            tokens=tokens,
            doc_lengths=lengths,
            domains=parsed.domains,
            flags=flags,
            bad=parsed.bad,
        )
