"""Progress of a generation run: per-replica append-only files of finished batches.

    PREFIX.progress/run.json          what is being generated (dataset, model, settings, plan)
    PREFIX.progress/shard-00000.bin   one file per data-parallel replica

Each file is an append-only log (``megatron_miniplm/progress_log.py``: a torn tail is
ignored, then truncated) of one record per finished batch: magic b"GEN1", the batch index,
its rows, then a length per row (u32) and the rows' tokens (i32). A rerun redoes exactly the
batches without a valid record. The layout of the directory (run.json, shard names) is the
scoring run's (scoring/resume.py).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from megatron_miniplm import progress_log


def _size(rows: int, first: bytes) -> int:
    """The payload's bytes: the lengths, then the tokens they count."""
    if len(first) < 4 * rows:
        return 4 * rows
    return 4 * rows + 4 * int(np.frombuffer(first, dtype=np.uint32, count=rows).sum(dtype=np.int64))


SEQUENCES = progress_log.Format(b"GEN1", _size)


def _payload(sequences: list[np.ndarray]) -> bytes:
    lengths = np.array([len(s) for s in sequences], dtype=np.uint32)
    tokens = np.concatenate(sequences).astype(np.int32) if sequences else np.zeros(0, np.int32)
    return lengths.tobytes() + tokens.tobytes()


def _sequences(record: progress_log.Record) -> list[np.ndarray]:
    lengths = np.frombuffer(record.payload, dtype=np.uint32, count=record.count).astype(np.int64)
    tokens = np.frombuffer(record.payload, dtype=np.int32, offset=4 * record.count)
    return np.split(tokens, np.cumsum(lengths)[:-1])


def iter_records(paths: list[str]) -> Iterator[tuple[int, list[np.ndarray]]]:
    for path in paths:
        for record in progress_log.records(path, SEQUENCES):
            yield record.key, _sequences(record)


def done_batches(paths: list[str], num_batches: int) -> np.ndarray:
    done = np.zeros(num_batches, dtype=bool)
    for path in paths:
        for record in progress_log.records(path, SEQUENCES):
            if 0 <= record.key < num_batches:
                done[record.key] = True
    return done


def record_offsets(paths: list[str]) -> dict[int, tuple[str, int]]:
    """Batch index -> (file, offset) of its first valid record: the assembly reads the
    batches in order one at a time, without holding the corpus in memory."""
    where: dict[int, tuple[str, int]] = {}
    for path in paths:
        for record in progress_log.records(path, SEQUENCES):
            where.setdefault(record.key, (path, record.start))
    return where


def read_record(path: str, offset: int) -> list[np.ndarray]:
    for record in progress_log.records(path, SEQUENCES, offset):
        return _sequences(record)
    raise ValueError(f"{path}: no valid record at offset {offset}")


class RecordWriter:
    """Appends records to this replica's file (``progress_log.Writer``), each fsynced with
    ``fsync``."""

    def __init__(self, path: str, fsync: bool = True):
        self._log = progress_log.Writer(open(path, "ab"), SEQUENCES, fsync=fsync)

    def append(self, batch_index: int, sequences: list[np.ndarray]) -> None:
        self._log.append(batch_index, len(sequences), _payload(sequences))

    def close(self) -> None:
        self._log.close()
