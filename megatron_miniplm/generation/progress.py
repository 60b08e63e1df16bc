"""Progress of a generation run: per-replica append-only files of finished batches.

    PREFIX.progress/run.json          what is being generated (dataset, model, settings, plan)
    PREFIX.progress/shard-00000.bin   one file per data-parallel replica

A record is one finished batch:

    magic b"GEN1" | batch index u64 | rows u32 | lengths u32 [rows] | tokens i32 [sum] | crc32 u32

A killed process leaves at most one torn record at the end of a file; readers stop at the
first record that is short or fails its checksum and the owner truncates it before
appending, so a rerun redoes exactly the batches without a valid record. The layout of the
directory (run.json, shard names) is the scoring run's (scoring/resume.py).
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Iterator

import numpy as np

MAGIC = b"GEN1"
_HEAD = struct.Struct("<4sQI")
_CRC = struct.Struct("<I")


def encode_record(batch_index: int, sequences: list[np.ndarray]) -> bytes:
    lengths = np.array([len(s) for s in sequences], dtype=np.uint32)
    tokens = np.concatenate(sequences).astype(np.int32) if sequences else np.zeros(0, np.int32)
    body = _HEAD.pack(MAGIC, batch_index, len(sequences)) + lengths.tobytes() + tokens.tobytes()
    return body + _CRC.pack(zlib.crc32(body))


def _records(f) -> Iterator[tuple[int, list[np.ndarray], int]]:
    """(batch index, sequences, end offset) of each valid record, stopping at a torn one."""
    pos = 0
    while True:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        magic, batch_index, rows = _HEAD.unpack(head)
        raw_lengths = f.read(4 * rows)
        if magic != MAGIC or len(raw_lengths) < 4 * rows:
            return
        lengths = np.frombuffer(raw_lengths, dtype=np.uint32).astype(np.int64)
        rest = f.read(4 * int(lengths.sum()) + _CRC.size)
        if len(rest) < 4 * int(lengths.sum()) + _CRC.size:
            return
        (crc,) = _CRC.unpack(rest[-_CRC.size:])
        if crc != zlib.crc32(rest[:-_CRC.size], zlib.crc32(raw_lengths, zlib.crc32(head))):
            return
        pos += len(head) + len(raw_lengths) + len(rest)
        tokens = np.frombuffer(rest[:-_CRC.size], dtype=np.int32)
        yield int(batch_index), np.split(tokens, np.cumsum(lengths)[:-1]), pos


def iter_records(paths: list[str]) -> Iterator[tuple[int, list[np.ndarray]]]:
    for path in paths:
        with open(path, "rb") as f:
            for batch_index, sequences, _ in _records(f):
                yield batch_index, sequences


def done_batches(paths: list[str], num_batches: int) -> np.ndarray:
    done = np.zeros(num_batches, dtype=bool)
    for batch_index, _ in iter_records(paths):
        if 0 <= batch_index < num_batches:
            done[batch_index] = True
    return done


def record_offsets(paths: list[str]) -> dict[int, tuple[str, int]]:
    """Batch index -> (file, offset) of its first valid record: the assembly reads the
    batches in order one at a time, without holding the corpus in memory."""
    where: dict[int, tuple[str, int]] = {}
    for path in paths:
        with open(path, "rb") as f:
            start = 0
            for batch_index, _, end in _records(f):
                where.setdefault(batch_index, (path, start))
                start = end
    return where


def read_record(path: str, offset: int) -> list[np.ndarray]:
    with open(path, "rb") as f:
        f.seek(offset)
        for _, sequences, _ in _records(f):
            return sequences
    raise ValueError(f"{path}: no valid record at offset {offset}")


class RecordWriter:
    """Appends records to this replica's file, a torn tail truncated first; each record is
    one write (a kill leaves it whole or torn), fsynced with ``fsync``."""

    def __init__(self, path: str, fsync: bool = True):
        self.fsync = fsync
        valid = 0
        if os.path.exists(path):
            with open(path, "rb") as f:
                for _, _, valid in _records(f):
                    pass
        self._file = open(path, "ab")
        if self._file.tell() != valid:
            self._file.truncate(valid)
            self._file.seek(valid)

    def append(self, batch_index: int, sequences: list[np.ndarray]) -> None:
        self._file.write(encode_record(batch_index, sequences))
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
