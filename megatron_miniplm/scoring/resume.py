"""Progress of a scoring run: per-rank append-only shards of finished batches.

    SCORES_PREFIX.progress/run.json        what is being computed (dataset, model,
                                            settings, plan digest); written once, atomically
    SCORES_PREFIX.progress/shard-00000.bin one file per data-parallel replica
    SCORES_PREFIX.progress/status.json     how far the run is (rank 0's replica, which the
                                            plan balances with the others): rewritten
                                            atomically every few seconds, for the pipeline's
                                            --status; never read to resume

A shard is a sequence of records, one per finished batch:

    magic b"SCR1" | batch index u64 | rows u32 | float64 [rows, 2] | crc32 u32

A SIGKILL can leave at most one torn record at the end of a shard; readers stop
at the first record that is short or fails its checksum, and the owner
truncates it before appending. A batch is recorded only after its scores are
complete, so a rerun redoes exactly the batches that have no valid record. The
final score file is assembled from the shards once every batch is recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from megatron_miniplm.atomic_io import close_quietly, disk_space, write_json_atomic

MAGIC = b"SCR1"
_HEAD = struct.Struct("<4sQI")
_CRC = struct.Struct("<I")
RUN_FILE = "run.json"
STATUS_FILE = "status.json"


def progress_dir(output_prefix: str) -> str:
    return output_prefix + ".progress"


def shard_path(directory: str, dp_rank: int) -> str:
    return os.path.join(directory, f"shard-{dp_rank:05d}.bin")


def encode_record(batch_index: int, scores: np.ndarray) -> bytes:
    scores = np.ascontiguousarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != 2:
        raise ValueError(f"scores must be [rows, 2], got {scores.shape}")
    body = _HEAD.pack(MAGIC, batch_index, scores.shape[0]) + scores.tobytes()
    return body + _CRC.pack(zlib.crc32(body))  # crc of header + payload


@dataclass(frozen=True)
class Record:
    batch_index: int
    scores: np.ndarray  # float64 [rows, 2]


def _records(f) -> Iterator[tuple[Record, int]]:
    """(record, end offset) for each valid record of an open shard, stopping at a torn one."""
    pos = 0
    while True:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        magic, batch_index, rows = _HEAD.unpack(head)
        if magic != MAGIC:
            return
        payload = f.read(16 * rows + _CRC.size)
        if len(payload) < 16 * rows + _CRC.size:
            return
        (crc,) = _CRC.unpack(payload[-_CRC.size:])
        if crc != zlib.crc32(payload[:-_CRC.size], zlib.crc32(head)):
            return
        pos += len(head) + len(payload)
        scores = np.frombuffer(payload, dtype=np.float64, count=2 * rows).reshape(rows, 2)
        yield Record(int(batch_index), scores), pos


def read_shard(path: str) -> tuple[list[Record], int]:
    """The valid records of a shard and the byte length they span (a torn tail is ignored)."""
    records, end = [], 0
    with open(path, "rb") as f:
        for record, end in _records(f):
            records.append(record)
    return records, end


def shard_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if n.startswith("shard-") and n.endswith(".bin"))
    return [os.path.join(directory, n) for n in names]


def iter_records(directory: str) -> Iterator[Record]:
    """Every valid record of every shard, streamed (shards can hold 10^8 rows)."""
    for path in shard_files(directory):
        with open(path, "rb") as f:
            for record, _ in _records(f):
                yield record


def _valid_length(path: str) -> int:
    end = 0
    with open(path, "rb") as f:
        for _, end in _records(f):
            pass
    return end


class ShardWriter:
    """Appends records to this replica's shard; truncates a torn tail first.

    Each record reaches the file (the kernel's page cache) as it is appended, which is
    what a killed process leaves behind; ``fsync`` makes it durable against a crash of
    the machine too, at most every ``sync_interval_s`` seconds and at close, instead of
    after every batch (a GPU scores a batch in milliseconds; an fsync can take longer)."""

    def __init__(self, path: str, fsync: bool = True, sync_interval_s: float = 5.0, clock=time.monotonic):
        self.path = path
        self.fsync = fsync
        self.sync_interval_s = sync_interval_s
        self._clock = clock
        self._synced_at = clock()
        valid = _valid_length(path) if os.path.exists(path) else 0
        self._file = open(path, "ab")
        if self._file.tell() != valid:
            self._file.truncate(valid)
            self._file.seek(valid)

    def append(self, batch_index: int, scores: np.ndarray) -> None:
        # One write call per record: a kill, or a full disk, leaves either the whole record or
        # a torn tail, which the next run truncates.
        with disk_space(self.path):
            self._file.write(encode_record(batch_index, scores))
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


def read_run(directory: str) -> Optional[dict]:
    path = os.path.join(directory, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_run(directory: str, run: dict) -> None:
    """Create the progress directory with its run description, atomically."""
    os.makedirs(directory, exist_ok=True)
    write_json_atomic(os.path.join(directory, RUN_FILE), run, sort_keys=True, ensure_ascii=True)


def write_status(directory: str, status: dict) -> None:
    write_json_atomic(os.path.join(directory, STATUS_FILE), status, sort_keys=True)


def read_status(directory: str) -> Optional[dict]:
    """The last status the run wrote; None before its first (or with a damaged file: it is a
    report, not state)."""
    try:
        with open(os.path.join(directory, STATUS_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def done_batches(directory: str, num_batches: int) -> np.ndarray:
    """bool [num_batches]: which batches have a valid record in some shard."""
    done = np.zeros(num_batches, dtype=bool)
    for record in iter_records(directory):
        if 0 <= record.batch_index < num_batches:
            done[record.batch_index] = True
    return done


def assemble(directory: str, order: np.ndarray, starts: np.ndarray, num_instances: int) -> np.ndarray:
    """The [num_instances, 2] score array from all shards of a finished run.

    Checks that every batch has a record with the planned number of rows and that
    repeated records of one batch (possible after a change of data-parallel size)
    agree bit for bit. Rows of instances outside the plan stay (0, 0).
    """
    num_batches = len(starts) - 1
    scores = np.zeros((num_instances, 2), dtype=np.float64)
    done = np.zeros(num_batches, dtype=bool)
    for record in iter_records(directory):
        k = record.batch_index
        if not 0 <= k < num_batches:
            raise ValueError(f"{directory}: record of batch {k}, but the plan has {num_batches} batches")
        ids = order[starts[k]: starts[k + 1]]
        if record.scores.shape[0] != len(ids):
            raise ValueError(f"{directory}: batch {k} recorded with {record.scores.shape[0]} rows, planned {len(ids)}")
        if done[k]:
            if not np.array_equal(scores[ids], record.scores):
                raise ValueError(f"{directory}: batch {k} recorded twice with different scores")
            continue
        done[k] = True
        scores[ids] = record.scores
    missing = int((~done).sum())
    if missing:
        raise ValueError(f"{directory}: {missing} of {num_batches} batches have no record")
    return scores


def remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
