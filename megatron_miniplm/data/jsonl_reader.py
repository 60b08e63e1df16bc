"""Streaming reader for .jsonl, .jsonl.gz and .jsonl.zst: line-aligned blocks, in order.

JSONL files are read in fixed-size pieces and decompressed incrementally, so memory does not
depend on file size (only on the longest line). The raw bytes are hashed on the way
(sha256 for the meta file), and a compressed stream that ends before its end-of-stream
marker is reported as truncated: gzip and zstd readers otherwise hand back a silent
prefix of the data.

Which inputs are JSONL, and with which compression, is decided by data/inputs.py, which
passes the compression in.
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Iterator

from megatron_miniplm.data.blocks import Block, FileDone, ReadFailure
from megatron_miniplm.data.records import BadRecord, SkipReason

COMPRESSIONS = ("none", "gzip", "zstd")
RAW_READ = 1 << 20  # bytes read from disk at a time
ZSTD_RAW_READ = 1 << 18  # smaller: zstd output per call is not capped
GZIP_OUT_MAX = 4 << 20  # most decompressed bytes per zlib call


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
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    return {"none": _PlainDecoder, "gzip": _GzipDecoder, "zstd": _ZstdDecoder}[compression]()


def _decode_errors():
    import zstandard

    return (zlib.error, zstandard.ZstdError)


def read_file(file_index: int, path: str, block_bytes: int = 1 << 20, *,
              compression: str) -> Iterator[Block | ReadFailure | FileDone]:
    """Blocks of about `block_bytes` decompressed bytes ending at a newline, then an
    optional ReadFailure, then FileDone (hash of the whole raw file, line count).
    `compression`: one of COMPRESSIONS."""
    dec = _decoder(compression)
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
