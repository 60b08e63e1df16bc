"""Append-only logs of framed records: the progress files long jobs (scoring, generation)
resume from after a kill.

A record is one write:

    magic (4 bytes) | key u64 | count u32 | payload | crc32 u32 (of everything before it)

The magic names the payload's format, the key what the record is of (a batch index), the
count its rows. How many bytes the payload holds follows from the count and, where a payload
says its own size (a length per row, then the rows), from its first bytes: ``Format.size``.
A killed process leaves at most one torn record, at the end of its file: readers stop at the
first record that is short, of another format or fails its checksum, and a writer truncates
the file there before appending, so a rerun redoes exactly the work without a valid record.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from megatron_miniplm.atomic_io import close_quietly, disk_space

_HEAD = struct.Struct("<4sQI")
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class Format:
    """``size(count, first_bytes)``: the payload's size in bytes, from its count and the bytes
    of it read so far; called again while it asks for more than has been read."""

    magic: bytes
    size: Callable[[int, bytes], int]


@dataclass(frozen=True)
class Record:
    key: int
    count: int
    payload: bytes
    start: int  # the record's offset in its file
    end: int  # the offset after it


def frame(fmt: Format, key: int, count: int, payload: bytes) -> bytes:
    body = _HEAD.pack(fmt.magic, key, count) + payload
    return body + _CRC.pack(zlib.crc32(body))


def read(f: BinaryIO, fmt: Format) -> Iterator[Record]:
    """The valid records of an open log from its position on, stopping at a torn one."""
    pos = f.tell()
    while True:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        magic, key, count = _HEAD.unpack(head)
        if magic != fmt.magic:
            return
        payload = b""
        while len(payload) < (size := fmt.size(count, payload)):
            more = f.read(size - len(payload))
            if not more:
                return
            payload += more
        tail = f.read(_CRC.size)
        if len(tail) < _CRC.size or _CRC.unpack(tail)[0] != zlib.crc32(payload, zlib.crc32(head)):
            return
        end = pos + len(head) + len(payload) + len(tail)
        yield Record(int(key), int(count), payload, pos, end)
        pos = end


def records(path: str, fmt: Format, offset: int = 0) -> Iterator[Record]:
    """The valid records of the log at ``path`` from ``offset`` on, streamed."""
    with open(path, "rb") as f:
        f.seek(offset)
        yield from read(f, fmt)


def valid_length(path: str, fmt: Format) -> int:
    """The bytes of the log's valid records (0 for a log not yet written)."""
    if not os.path.exists(path):
        return 0
    end = 0
    for record in records(path, fmt):
        end = record.end
    return end


class Writer:
    """Appends records to a log its owner opened (``open(path, "ab")``; the writer closes it),
    a torn tail truncated first. Each record is one write: a kill, or a full disk, leaves it
    whole or torn. It reaches the file (the kernel's page cache) as it is appended, which is
    what a killed process leaves behind; ``fsync`` makes it durable against a crash of the
    machine too, at most every ``sync_interval_s`` seconds (0: every record) and at close."""

    def __init__(self, file: BinaryIO, fmt: Format, *, fsync: bool = True, sync_interval_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self._file, self.path, self.fmt = file, file.name, fmt
        self.fsync, self.sync_interval_s, self._clock = fsync, sync_interval_s, clock
        self._synced_at = clock()
        try:
            valid = valid_length(self.path, fmt)
            if file.tell() != valid:
                file.truncate(valid)
                file.seek(valid)
        except BaseException:
            close_quietly(file)
            raise

    def append(self, key: int, count: int, payload: bytes) -> None:
        with disk_space(self.path):
            self._file.write(frame(self.fmt, key, count, payload))
            self._file.flush()
            if self.fsync and self._clock() - self._synced_at >= self.sync_interval_s:
                self._sync()

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._synced_at = self._clock()

    def close(self) -> None:
        try:
            with disk_space(self.path):
                self._file.flush()
                if self.fsync:
                    self._sync()
        finally:
            close_quietly(self._file)
