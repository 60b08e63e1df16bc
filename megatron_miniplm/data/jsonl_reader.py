"""Streaming reader for .jsonl, .jsonl.gz and .jsonl.zst: line-aligned blocks, in order.

Also the inputs of a run: `resolve_inputs` accepts these, Parquet files and `datasets`
directories, and `read_blocks` reads each in argument order, the latter two through
data/arrow_reader.py (whose `RecordBlock`s carry texts instead of lines).

JSONL files are read in fixed-size pieces and decompressed incrementally, so memory does not
depend on file size (only on the longest line). The raw bytes are hashed on the way
(sha256 for the meta file), and a compressed stream that ends before its end-of-stream
marker is reported as truncated: gzip and zstd readers otherwise hand back a silent
prefix of the data.
"""
from __future__ import annotations

import glob
import hashlib
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from megatron_miniplm.data.records import BadRecord, SkipReason

TEXT_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", "": "none"}
PARQUET_SUFFIX = ".parquet"
ARROW_FORMATS = ("parquet", "arrow")  # compression_of() of the inputs data/arrow_reader.py reads
DATASETS_STATE = "state.json"  # what makes a directory a `datasets` save_to_disk directory
RAW_READ = 1 << 20  # bytes read from disk at a time
ZSTD_RAW_READ = 1 << 18  # smaller: zstd output per call is not capped
GZIP_OUT_MAX = 4 << 20  # most decompressed bytes per zlib call


class InputNotFoundError(FileNotFoundError):
    pass


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
        from megatron_miniplm.data.arrow_reader import datasets_files

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
                from megatron_miniplm.data.arrow_reader import datasets_files

                datasets_files(path)  # its state file is readable and its data files exist
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    if not out:
        raise InputNotFoundError("no input files given")
    return out


@dataclass(frozen=True)
class Block:
    """Complete lines of one file (the file's last line may lack its newline)."""

    file_index: int
    first_line: int
    data: bytes
    num_lines: int
    raw_pos: int = 0  # raw (compressed) bytes of the file read so far: for progress


@dataclass(frozen=True)
class ReadFailure:
    """The file could not be read past `record.line`; the partial line is dropped."""

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


class _PlainDecoder:
    raw_read = RAW_READ

    def feed(self, data: bytes) -> Iterator[bytes]:
        yield data

    def truncated(self) -> bool:
        return False


class _GzipDecoder:
    """zlib in gzip mode; several concatenated members are one stream, as with gzip -d."""

    raw_read = RAW_READ

    def __init__(self):
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if not self._started and data[:1] == b"\0" and not data.strip(b"\0"):
                return  # zero padding after the last member
            self._started = True
            out = self._d.decompress(data, GZIP_OUT_MAX)
            if out:
                yield out
            if self._d.eof:
                data = self._d.unused_data
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._started = False
            else:
                data = self._d.unconsumed_tail

    def truncated(self) -> bool:
        return self._started


class _ZstdDecoder:
    """zstandard's stream reader does not report a truncated frame; decompressobj does."""

    raw_read = ZSTD_RAW_READ

    def __init__(self):
        import zstandard

        self._dctx = zstandard.ZstdDecompressor()
        self._d = self._dctx.decompressobj()
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            self._started = True
            out = self._d.decompress(data)
            if out:
                yield out
            if self._d.eof:
                data = self._d.unused_data
                self._d = self._dctx.decompressobj()
                self._started = False
            else:
                data = b""

    def truncated(self) -> bool:
        return self._started


def _decoder(compression: str):
    return {"none": _PlainDecoder, "gzip": _GzipDecoder, "zstd": _ZstdDecoder}[compression]()


def _decode_errors():
    import zstandard

    return (zlib.error, zstandard.ZstdError)


def read_file(file_index: int, path: str, block_bytes: int = 1 << 20) -> Iterator[Block | ReadFailure | FileDone]:
    """Blocks of about `block_bytes` decompressed bytes ending at a newline, then an
    optional ReadFailure, then FileDone (hash of the whole raw file, line count)."""
    dec = _decoder(compression_of(path))
    errors = _decode_errors()
    sha = hashlib.sha256()
    raw_bytes = text_bytes = lines = 0
    pending: list[bytes] = []
    pending_len = 0
    failure: tuple[SkipReason, str] | None = None

    with open(path, "rb") as f:
        while raw := f.read(dec.raw_read):
            sha.update(raw)
            raw_bytes += len(raw)
            if failure is not None:
                continue  # keep hashing: the meta records the file as it is on disk
            try:
                for piece in dec.feed(raw):
                    text_bytes += len(piece)
                    pos = 0  # cut blocks of about block_bytes at the next line end
                    while pending_len + len(piece) - pos >= block_bytes:
                        nl = piece.find(b"\n", max(pos, pos + block_bytes - pending_len - 1))
                        if nl < 0:
                            break  # a long line: wait for its end without re-joining
                        data = b"".join(pending) + piece[pos: nl + 1]
                        pending, pending_len, pos = [], 0, nl + 1
                        n = data.count(b"\n")
                        yield Block(file_index, lines + 1, data, n, raw_bytes)
                        lines += n
                    if pos < len(piece):
                        pending.append(piece[pos:] if pos else piece)
                        pending_len += len(piece) - pos
            except errors as e:
                failure = (SkipReason.CORRUPT_INPUT, f"cannot decompress: {e}")
        if failure is None and dec.truncated():
            failure = (SkipReason.TRUNCATED_INPUT, "compressed stream ends early (truncated file)")

    data = b"".join(pending)
    if failure is not None:
        # The complete lines before the damage are good; the partial one is not.
        data = data[: data.rfind(b"\n") + 1]
    if data:
        n = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        yield Block(file_index, lines + 1, data, n, raw_bytes)
        lines += n
    if failure is not None:
        yield ReadFailure(file_index, BadRecord(lines + 1, *failure))
    yield FileDone(file_index, path, sha.hexdigest(), raw_bytes, text_bytes, lines)


def read_blocks(
    paths: Sequence[str],
    block_bytes: int = 1 << 20,
    text_key: tuple[str, ...] = ("text",),
    domain_key: tuple[str, ...] | None = ("meta", "pile_set_name"),
) -> Iterator:
    """Every input in order: JSONL as `Block`s of lines, Parquet files and `datasets`
    directories as `arrow_reader.RecordBlock`s (the keys name their columns), each file
    followed by its FileDone."""
    for i, path in enumerate(paths):
        if compression_of(path) in ARROW_FORMATS:
            from megatron_miniplm.data.arrow_reader import read_arrow_input

            yield from read_arrow_input(i, path, block_bytes, text_key, domain_key)
        else:
            yield from read_file(i, path, block_bytes)
