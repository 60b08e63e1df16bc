"""What every reader yields, in input order, and what the pipeline consumes.

For each input, a reader yields blocks (`Block`: complete JSONL lines, parsed by the
workers; `RecordBlock`: rows of Parquet or `datasets` inputs, validated by the reader),
then at most one `ReadFailure` (the input cannot be read past some line or row), then
exactly one `FileDone`. The readers (data/jsonl_reader.py, data/arrow_reader.py) and
the dispatch over them (data/inputs.py) share these types through this module, so that
no reader imports another.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_miniplm.data.records import BadRecord
from megatron_miniplm.errors import UserError


class InputNotFoundError(UserError, FileNotFoundError):
    """An input named on the command line, or a data file a `datasets` directory lists, is missing."""


@dataclass(frozen=True)
class Block:
    """Complete lines of one file (the file's last line may lack its newline)."""

    file_index: int
    first_line: int
    data: bytes
    num_lines: int
    raw_pos: int = 0  # raw (compressed) bytes of the file read so far: for progress


@dataclass(frozen=True)
class RecordBlock:
    """Consecutive rows of one input, already validated: the texts and domains of the
    usable rows, in order, and a BadRecord for each other row."""

    file_index: int
    first_line: int  # 1-based row number of the block's first row in the input
    texts: list[str]
    domains: list[str]
    bad: list[BadRecord] = field(default_factory=list)
    num_lines: int = 0  # rows, usable or not
    text_bytes: int = 0  # UTF-8 bytes of the rows' text values
    raw_pos: int = 0  # bytes of the input on disk read so far (approximate): for progress


@dataclass(frozen=True)
class ReadFailure:
    """The input could not be read past `record.line`; a JSONL file's partial line is dropped."""

    file_index: int
    record: BadRecord


@dataclass(frozen=True)
class FileDone:
    file_index: int
    path: str
    sha256: str
    raw_bytes: int
    text_bytes: int
    lines: int
