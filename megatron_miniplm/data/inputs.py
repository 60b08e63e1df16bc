"""The inputs of a preprocessing run: which they are, what format each is in, and which
reader reads it.

`resolve_inputs` expands the --input arguments (files, globs, `datasets` directories)
in argument order; `compression_of` decides each input's format from its name (or, for
a directory, from the `datasets` state file in it); `read_blocks` reads the inputs in
order, each with its reader:

    .jsonl / .json / .ndjson, optionally .gz or .zst   data/jsonl_reader.py  Blocks of lines
    .parquet                                           data/arrow_reader.py  RecordBlocks of rows
    a `datasets` save_to_disk directory                data/arrow_reader.py  RecordBlocks of rows

This is the only module that knows every format; the readers know only their own and
share their types through data/blocks.py.
"""
from __future__ import annotations

import glob
import os
from typing import Iterator, Sequence

from megatron_miniplm.data.arrow_reader import DATASETS_STATE, datasets_files, read_datasets_dir, read_parquet
from megatron_miniplm.data.blocks import Block, FileDone, InputNotFoundError, ReadFailure, RecordBlock
from megatron_miniplm.data.jsonl_reader import read_file

TEXT_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", "": "none"}
PARQUET_SUFFIX = ".parquet"
ARROW_FORMATS = ("parquet", "arrow")  # compression_of() of the inputs data/arrow_reader.py reads


def is_datasets_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DATASETS_STATE))


def compression_of(path: str) -> str:
    """The input's encoding: 'none', 'gzip' or 'zstd' for JSONL, 'parquet' for a Parquet
    file, 'arrow' for a `datasets` directory (Arrow IPC streams); raises ValueError for
    anything else."""
    if os.path.isdir(path):
        if is_datasets_dir(path):
            return "arrow"
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            raise ValueError(f"{path}: a datasets DatasetDict directory: give one of its splits' directories")
        raise ValueError(f"{path}: a directory without {DATASETS_STATE} (not saved by datasets' save_to_disk)")
    if path.lower().endswith(PARQUET_SUFFIX):
        return "parquet"
    base, ext = os.path.splitext(path)
    comp = COMPRESSION_SUFFIXES.get(ext)
    if comp is None or comp == "none":
        base, comp = path, "none"
    if not base.endswith(TEXT_SUFFIXES):
        raise ValueError(
            f"{path}: unsupported input type (expected {', '.join(TEXT_SUFFIXES)}, optionally with .gz or .zst, "
            f"{PARQUET_SUFFIX}, or a datasets save_to_disk directory)"
        )
    return comp


def input_bytes(path: str) -> int:
    """Bytes on disk of an input: the file, or a `datasets` directory's data files."""
    if os.path.isdir(path):
        return sum(os.path.getsize(f) for f in datasets_files(path))
    return os.path.getsize(path)


def resolve_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand files and globs, in argument order (each glob sorted), without duplicates.
    A `datasets` directory is one input, named or matched by a glob (other directories
    a glob matches are ignored)."""
    out: list[str] = []
    seen = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p) or is_datasets_dir(p))
            if not matches:
                raise InputNotFoundError(f"{pattern}: the pattern matches no files")
        elif os.path.isfile(pattern) or os.path.isdir(pattern):
            matches = [pattern]
        else:
            raise InputNotFoundError(f"{pattern}: input file not found")
        for path in matches:
            if compression_of(path) == "arrow":
                datasets_files(path)  # its state file is readable and its data files exist
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    if not out:
        raise InputNotFoundError("no input files given")
    return out


def read_input(
    file_index: int,
    path: str,
    block_bytes: int = 1 << 20,
    text_key: tuple[str, ...] = ("text",),
    domain_key: tuple[str, ...] | None = ("meta", "pile_set_name"),
) -> Iterator[Block | RecordBlock | ReadFailure | FileDone]:
    """One input by its reader: JSONL as `Block`s of lines, a Parquet file or a `datasets`
    directory as `RecordBlock`s (the keys name their columns), then an optional
    ReadFailure, then its FileDone."""
    compression = compression_of(path)
    if compression == "parquet":
        return read_parquet(file_index, path, block_bytes, text_key, domain_key)
    if compression == "arrow":
        return read_datasets_dir(file_index, path, block_bytes, text_key, domain_key)
    return read_file(file_index, path, block_bytes, compression=compression)


def read_blocks(
    paths: Sequence[str],
    block_bytes: int = 1 << 20,
    text_key: tuple[str, ...] = ("text",),
    domain_key: tuple[str, ...] | None = ("meta", "pile_set_name"),
) -> Iterator[Block | RecordBlock | ReadFailure | FileDone]:
    """Every input in order, each read by read_input (file_index: its position in `paths`)."""
    for i, path in enumerate(paths):
        yield from read_input(i, path, block_bytes, text_key, domain_key)
