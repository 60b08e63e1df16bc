"""The next global batch built in a background thread while this one trains.

Reading instances from the memory-mapped dataset and collating them costs host time
that a GPU step does not wait for if it is done ahead: while step k runs, a worker
thread builds step k + 1's micro-batches (pinned on a GPU, so that the forward step's
``non_blocking`` copies overlap). Batches depend only on the sample index they start
at, so running ahead changes nothing in what is trained on; a batch asked for at
another start (after a resume, or when the caller jumps) is simply built in place.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

from megatron_miniplm import platform


class Prefetcher:
    """``take(start)`` returns ``build(start)``, and starts building ``build(start + step)``
    when that start is below ``end`` (the first sample no step will read)."""

    def __init__(self, build: Callable[[int], list], step: int, end: int, enabled: bool = True):
        self._build, self._step, self._end = build, step, end
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if enabled else None
        self._pending: Optional[tuple[int, Future]] = None

    def _make(self, start: int) -> list:
        return [platform.pin(batch) for batch in self._build(start)]

    def take(self, start: int) -> list:
        if self._pending is not None and self._pending[0] == start:
            batches = self._pending[1].result()
        else:
            if self._pending is not None:
                self._pending[1].cancel()
            batches = self._make(start)
        self._pending = None
        if self._pool is not None and start + self._step < self._end:
            self._pending = (start + self._step, self._pool.submit(self._make, start + self._step))
        return batches

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
