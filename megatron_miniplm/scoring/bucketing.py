"""Length bucketing: the fixed plan of scoring batches, decided up front from lengths alone.

Instances are sorted longest first (ties by instance id) and cut into consecutive
batches, so the instances of a batch have nearly the same length and padding wastes
little. A batch holds ``micro_batch_size`` instances, or more when they are short,
up to a token budget (``max_tokens``), so that short instances do not run in tiny,
inefficient batches.

The plan depends only on the instance lengths and the two sizes. Every rank
computes the same plan, a killed run recomputes it identically on restart, and
each batch always holds the same instances with the same padding: that is what
makes a resumed run's output bit-identical to an uninterrupted one (under expert
parallelism with the same batches beside it as well: replica_runs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np


@dataclass(frozen=True)
class Batch:
    index: int  # position in the plan
    ids: np.ndarray  # global instance ids, longest first
    seq_length: int  # model input length (longest instance minus one)
    tokens: int  # predictions computed (sum over instances of length - 1)


@dataclass(frozen=True)
class BatchPlan:
    """All batches as flat arrays (cheap at 10^8 instances): batch k is
    ``order[starts[k]:starts[k + 1]]``, run at input length ``seq_lengths[k]``."""

    order: np.ndarray  # int64 [M], instance ids in batch order
    starts: np.ndarray  # int64 [B + 1]
    seq_lengths: np.ndarray  # int64 [B]
    batch_tokens: np.ndarray  # int64 [B]
    skipped: np.ndarray  # int64 ids of instances too short to give a prediction

    def __len__(self) -> int:
        return len(self.seq_lengths)

    def batch(self, k: int) -> Batch:
        ids = self.order[self.starts[k]: self.starts[k + 1]]
        return Batch(index=k, ids=ids, seq_length=int(self.seq_lengths[k]),
                     tokens=int(self.batch_tokens[k]))

    def batch_sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def digest(self) -> str:
        """Identity of the plan: a resumed run must continue the very same batches."""
        h = hashlib.sha256()
        for a in (self.order, self.starts, self.seq_lengths, self.batch_tokens):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()


def plan_batches(lengths: np.ndarray, micro_batch_size: int,
                 max_tokens: Optional[int] = None) -> BatchPlan:
    """Cut instances (``lengths``: tokens per instance) into length-sorted batches.

    A batch whose longest instance gives ``s`` predictions holds
    ``max(micro_batch_size, max_tokens // s)`` instances (the rest of the run if
    fewer remain). ``max_tokens`` defaults to ``micro_batch_size`` times the
    longest instance's predictions: full-length batches keep ``micro_batch_size``
    rows, short ones take more rows for the same work.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {micro_batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.arange(len(lengths), dtype=np.int64)
    usable = lengths >= 2
    skipped = ids[~usable]
    ids = ids[usable]
    predictions = lengths[usable] - 1
    order = ids[np.lexsort((ids, -predictions))]  # longest first, then by id
    sorted_pred = lengths[order] - 1
    if max_tokens is None:
        max_tokens = micro_batch_size * int(sorted_pred[0]) if len(order) else micro_batch_size
    starts, seqs = [0], []
    k, n = 0, len(order)
    while k < n:
        s = int(sorted_pred[k])
        rows = max(micro_batch_size, max_tokens // s)
        k = min(n, k + rows)
        starts.append(k)
        seqs.append(s)
    starts = np.asarray(starts, dtype=np.int64)
    tokens = np.add.reduceat(sorted_pred, starts[:-1]) if len(seqs) else np.zeros(0, np.int64)
    return BatchPlan(order=order, starts=starts, seq_lengths=np.asarray(seqs, dtype=np.int64),
                     batch_tokens=np.asarray(tokens, dtype=np.int64), skipped=skipped)


def replica_batches(plan: BatchPlan, dp_rank: int, dp_size: int) -> np.ndarray:
    """Batch indices of one data-parallel replica: round robin, so replicas get
    batches of alternating, nearly equal lengths and finish at about the same time."""
    return np.arange(dp_rank, len(plan), dp_size, dtype=np.int64)


def replica_runs(plan: BatchPlan, done: np.ndarray, dp_size: int, lockstep: bool) -> list[np.ndarray]:
    """The batches each replica runs this session (-1: a dummy, whose scores are dropped).

    A replica alone runs its batches not yet recorded (``done``). In ``lockstep`` (expert
    parallelism: the replicas exchange tokens inside every expert layer and an expert's GEMM
    runs over the tokens of all of them, so a batch's scores may depend, in the last bits, on
    the batches run beside it) position p of every replica's list runs in the same step as
    in an uninterrupted run: the replicas resume together at the first position that some
    replica has not recorded (a batch recorded after it is run again, beside the same
    batches, and recorded again with the same scores), and a replica with fewer batches
    ends with dummies, as many as the busiest replica has batches more."""
    lists = [replica_batches(plan, r, dp_size) for r in range(dp_size)]
    if not lockstep:
        return [b[~done[b]] for b in lists]
    start = min(_recorded_prefix(done[b]) for b in lists)
    longest = max(len(b) for b in lists)
    return [np.concatenate([b[start:], np.full(longest - len(b), -1, np.int64)]) for b in lists]


def _recorded_prefix(recorded: np.ndarray) -> int:
    """How many leading entries are True."""
    return len(recorded) if recorded.all() else int(np.argmin(recorded))


def steps(batches: np.ndarray, per_step: int) -> Iterator[np.ndarray]:
    """Consecutive groups of ``per_step`` batch indices: one pipeline schedule call each."""
    for i in range(0, len(batches), per_step):
        yield batches[i: i + per_step]
