"""Progress shards: records survive, a torn tail is ignored then truncated, assembly checks."""

import os

import numpy as np
import pytest

from megatron_miniplm.scoring import resume


def scores(rows, base):
    return np.arange(2 * rows, dtype=np.float64).reshape(rows, 2) + base + 0.125


def append(path, *records):
    """Open the shard (truncating a torn tail), append (batch index, scores) records, close."""
    w = resume.ShardWriter(path, fsync=False)
    for batch_index, rows in records:
        w.append(batch_index, rows)
    w.close()


def test_records_round_trip(tmp_path):
    path = str(tmp_path / "shard-00000.bin")
    append(path, (3, scores(2, 0)), (0, scores(1, 10)))
    records, end = resume.read_shard(path)
    assert [r.batch_index for r in records] == [3, 0]
    assert np.array_equal(records[0].scores, scores(2, 0))
    assert end == os.path.getsize(path)


@pytest.mark.parametrize("cut", [1, 10, 20, 40])
def test_torn_tail_is_ignored_and_truncated_before_appending(tmp_path, cut):
    path = str(tmp_path / "shard-00000.bin")
    append(path, (0, scores(2, 0)), (1, scores(2, 5)))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - cut)  # a kill in the middle of the second record
    records, end = resume.read_shard(path)
    assert [r.batch_index for r in records] == [0]
    assert end == size // 2  # the valid length stops after the first (same-sized) record
    append(path, (1, scores(2, 5)))
    assert [r.batch_index for r in resume.read_shard(path)[0]] == [0, 1]
    assert os.path.getsize(path) == size


def test_corrupt_record_stops_reading(tmp_path):
    path = str(tmp_path / "shard-00000.bin")
    append(path, (0, scores(1, 0)), (1, scores(1, 1)))
    data = bytearray(open(path, "rb").read())
    data[-8] ^= 0xFF  # flip a payload byte of the last record: its checksum fails
    open(path, "wb").write(bytes(data))
    assert [r.batch_index for r in resume.read_shard(path)[0]] == [0]


def plan():
    order = np.array([4, 0, 2, 1, 3])  # batch 0 = [4, 0], batch 1 = [2, 1, 3]
    starts = np.array([0, 2, 5])
    return order, starts


def test_assemble_puts_rows_in_dataset_order(tmp_path):
    order, starts = plan()
    d = str(tmp_path)
    append(resume.shard_path(d, 1), (1, scores(3, 100)))
    append(resume.shard_path(d, 0), (0, scores(2, 0)))
    assert resume.done_batches(d, 2).tolist() == [True, True]
    got = resume.assemble(d, order, starts, 6)
    assert np.array_equal(got[[4, 0]], scores(2, 0))
    assert np.array_equal(got[[2, 1, 3]], scores(3, 100))
    assert got[5].tolist() == [0.0, 0.0]  # an instance outside the plan (too short)


def test_assemble_refuses_missing_conflicting_or_misshapen(tmp_path):
    order, starts = plan()
    d = str(tmp_path)
    append(resume.shard_path(d, 0), (0, scores(2, 0)))
    assert resume.done_batches(d, 2).tolist() == [True, False]
    with pytest.raises(ValueError, match="1 of 2 batches have no record"):
        resume.assemble(d, order, starts, 5)
    append(resume.shard_path(d, 1), (1, scores(3, 0)), (0, scores(2, 0)))  # a duplicate that agrees: fine
    resume.assemble(d, order, starts, 5)
    append(resume.shard_path(d, 2), (0, scores(2, 1)))
    with pytest.raises(ValueError, match="twice with different scores"):
        resume.assemble(d, order, starts, 5)
    os.remove(resume.shard_path(d, 2))
    append(resume.shard_path(d, 3), (1, scores(2, 0)))
    with pytest.raises(ValueError, match="planned 3"):
        resume.assemble(d, order, starts, 5)


def test_run_file_is_written_atomically(tmp_path):
    d = str(tmp_path / "x.progress")
    assert resume.read_run(d) is None
    run = {"b": 1, "a": {"path": "/d\u00e9j\u00e0"}}
    resume.write_run(d, run)
    assert resume.read_run(d) == run
    assert os.listdir(d) == ["run.json"]  # no temporary left behind
    with open(os.path.join(d, "run.json"), encoding="utf-8") as f:
        assert f.read() == '{\n  "a": {\n    "path": "/d\\u00e9j\\u00e0"\n  },\n  "b": 1\n}\n'  # sorted keys, ASCII


def test_records_reach_the_file_at_once_and_fsync_is_paced(tmp_path, monkeypatch):
    """Every appended record is readable without a close (what a killed process leaves);
    fsync runs at most every sync_interval_s seconds of the clock, and at close."""
    synced = []
    monkeypatch.setattr(resume.os, "fsync", lambda fd: synced.append(now[0]))
    now = [0.0]
    path = str(tmp_path / "shard-00000.bin")
    w = resume.ShardWriter(path, fsync=True, sync_interval_s=5.0, clock=lambda: now[0])
    for k in range(13):  # one batch a second
        now[0] = float(k)
        w.append(k, scores(1, k))
        assert [r.batch_index for r in resume.read_shard(path)[0]] == list(range(k + 1))
    assert synced == [5.0, 10.0]
    w.close()
    assert synced == [5.0, 10.0, 12.0]


def test_a_full_disk_stops_with_the_shard_named_and_the_rerun_continues(tmp_path, monkeypatch):
    """The record that did not fit is a torn tail: the next run truncates it and appends again."""
    from disk_full import FullDisk
    from megatron_miniplm.atomic_io import DiskFullError

    path = str(tmp_path / "shard-00000.bin")
    append(path, (0, scores(2, 0)))
    record = os.path.getsize(path)
    disk = FullDisk(monkeypatch, [resume], budget=record // 2)
    w = resume.ShardWriter(path, fsync=False)
    with pytest.raises(DiskFullError, match=rf"^{path}: no space left on the device"):
        w.append(1, scores(2, 5))
    w.close()
    assert os.path.getsize(path) == record + record // 2  # half a record reached the disk
    disk.budget = None
    append(path, (1, scores(2, 5)))
    assert [r.batch_index for r in resume.read_shard(path)[0]] == [0, 1]
