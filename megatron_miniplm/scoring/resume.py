"""Progress of a scoring run: per-rank append-only shards of finished batches.

    SCORES_PREFIX.progress/run.json        what is being computed (dataset, model,
                                            settings, plan digest); written once, atomically
    SCORES_PREFIX.progress/shard-00000.bin one file per data-parallel replica
    SCORES_PREFIX.progress/status.json     how far the run is (rank 0's replica, which the
                                            plan balances with the others): rewritten
                                            atomically every few seconds, for the pipeline's
                                            --status; never read to resume

A shard is an append-only log (``megatron_miniplm/progress_log.py``: a torn tail is ignored,
then truncated) of one record per finished batch: magic b"SCR1", the batch index, its rows,
their scores as float64 [rows, 2]. A batch is recorded only after its scores are complete, so
a rerun redoes exactly the batches that have no valid record. The final score file is
assembled from the shards once every batch is recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from megatron_miniplm import progress_log
from megatron_miniplm.atomic_io import write_json_atomic

RUN_FILE = "run.json"
STATUS_FILE = "status.json"
SCORES = progress_log.Format(b"SCR1", lambda rows, _: 16 * rows)  # float64 [rows, 2]


def progress_dir(output_prefix: str) -> str:
    return output_prefix + ".progress"


def shard_path(directory: str, dp_rank: int) -> str:
    return os.path.join(directory, f"shard-{dp_rank:05d}.bin")


def _payload(scores: np.ndarray) -> bytes:
    scores = np.ascontiguousarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != 2:
        raise ValueError(f"scores must be [rows, 2], got {scores.shape}")
    return scores.tobytes()


@dataclass(frozen=True)
class Record:
    batch_index: int
    scores: np.ndarray  # float64 [rows, 2]


def _record(r: progress_log.Record) -> Record:
    return Record(r.key, np.frombuffer(r.payload, dtype=np.float64).reshape(r.count, 2))


def read_shard(path: str) -> tuple[list[Record], int]:
    """The valid records of a shard and the byte length they span (a torn tail is ignored)."""
    records, end = [], 0
    for r in progress_log.records(path, SCORES):
        records.append(_record(r))
        end = r.end
    return records, end


def shard_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if n.startswith("shard-") and n.endswith(".bin"))
    return [os.path.join(directory, n) for n in names]


def iter_records(directory: str) -> Iterator[Record]:
    """Every valid record of every shard, streamed (shards can hold 10^8 rows)."""
    for path in shard_files(directory):
        yield from map(_record, progress_log.records(path, SCORES))


class ShardWriter:
    """Appends records to this replica's shard (``progress_log.Writer``), fsynced at most every
    ``sync_interval_s`` seconds and at close instead of after every batch: a GPU scores a
    batch in milliseconds, an fsync can take longer."""

    def __init__(self, path: str, fsync: bool = True, sync_interval_s: float = 5.0, clock=time.monotonic):
        self.path = path
        self._log = progress_log.Writer(open(path, "ab"), SCORES, fsync=fsync, sync_interval_s=sync_interval_s,
                                        clock=clock)

    def append(self, batch_index: int, scores: np.ndarray) -> None:
        payload = _payload(scores)
        self._log.append(batch_index, len(payload) // 16, payload)

    def close(self) -> None:
        self._log.close()


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
