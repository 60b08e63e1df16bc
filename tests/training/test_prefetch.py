"""The background batch builder returns exactly what building in place would."""

import threading

from megatron_miniplm.training.prefetch import Prefetcher


def _recording_build(calls):
    def build(start):
        calls.append((start, threading.current_thread().name))
        return [{"start": start}]
    return build


def test_it_builds_the_next_batch_ahead_in_a_thread():
    calls = []
    p = Prefetcher(_recording_build(calls), step=8, end=32)
    assert p.take(0) == [{"start": 0}]
    assert p.take(8) == [{"start": 8}] and p.take(16) == [{"start": 16}] and p.take(24) == [{"start": 24}]
    p.close()
    starts = [s for s, _ in calls]
    assert starts == [0, 8, 16, 24]  # nothing at or past the end
    assert all(name.startswith("prefetch") for s, name in calls if s > 0)


def test_an_unexpected_start_is_built_in_place():
    calls = []
    p = Prefetcher(_recording_build(calls), step=8, end=100)
    p.take(0)
    assert p.take(40) == [{"start": 40}]  # a jump (a resume elsewhere): not the prefetched 8
    assert p.take(48) == [{"start": 48}]
    p.close()
    assert p.take(56) == [{"start": 56}]  # closed: builds in place


def test_disabled_builds_in_place_only():
    calls = []
    p = Prefetcher(_recording_build(calls), step=8, end=100, enabled=False)
    assert [p.take(s)[0]["start"] for s in (0, 8, 16)] == [0, 8, 16]
    assert [s for s, _ in calls] == [0, 8, 16]
    assert {name for _, name in calls} == {threading.current_thread().name}
