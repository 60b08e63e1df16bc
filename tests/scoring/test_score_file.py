"""The score-file reader/writer: round trip, atomicity, and clear errors."""
import json
import os

import numpy as np
import pytest

from megatron_miniplm.scoring.score_file import (
    ScoreFileError, ScoreFileWriter, check_scores_match, file_sha256, load_scores, save_scores,
)

META = {"dataset_fingerprint": "ab" * 32, "model": {"name": "teacher", "params": 135_000_000}}


def test_round_trip_is_memory_mapped_and_exact(tmp_path):
    arr = np.random.default_rng(0).random((1001, 2)) * 100
    p = str(tmp_path / "s")
    written = save_scores(p, arr, META)
    got, meta = load_scores(p, verify_sha256=True)
    assert isinstance(got, np.memmap) and got.dtype == np.float64 and not got.flags.writeable
    np.testing.assert_array_equal(got, arr)
    assert meta == written and meta["format_version"] == 1 and meta["num_instances"] == 1001
    assert meta["model"] == META["model"] and meta["sha256"] == file_sha256(p + ".npy")
    assert sorted(os.listdir(tmp_path)) == ["s.meta.json", "s.npy"]  # no temporary left behind


def test_integer_counts_are_stored_as_float64(tmp_path):
    p = str(tmp_path / "s")
    save_scores(p, np.array([[3, 2], [5, 1]], dtype=np.int64), META)
    got, _ = load_scores(p)
    assert got.dtype == np.float64 and got.tolist() == [[3.0, 2.0], [5.0, 1.0]]


def test_streaming_writer_and_abort(tmp_path):
    p = str(tmp_path / "w")
    with ScoreFileWriter(p, 10, META) as w:
        w.array[:] = np.arange(20.0).reshape(10, 2)
        w.commit()
    np.testing.assert_array_equal(load_scores(p)[0], np.arange(20.0).reshape(10, 2))
    with pytest.raises(RuntimeError):
        with ScoreFileWriter(str(tmp_path / "x"), 10, META):
            raise RuntimeError("scoring crashed")
    assert sorted(os.listdir(tmp_path)) == ["w.meta.json", "w.npy"]


def test_overwrite_replaces_both_files(tmp_path):
    p = str(tmp_path / "s")
    save_scores(p, np.ones((5, 2)), META)
    save_scores(p, np.full((7, 2), 2.0), dict(META, model={"name": "other"}))
    got, meta = load_scores(p)
    assert got.shape == (7, 2) and meta["model"] == {"name": "other"} and meta["num_instances"] == 7


@pytest.mark.parametrize("array,meta,match", [
    (np.zeros((4, 3)), META, r"shape \[N, 2\]"),
    (np.zeros(4), META, r"shape \[N, 2\]"),
    (np.array([["a", "b"]]), META, "numeric"),
    (np.zeros((4, 2)), {"model": {}}, "dataset_fingerprint"),
    (np.zeros((4, 2)), {"dataset_fingerprint": "x"}, "'model'"),
    (np.zeros((4, 2)), dict(META, num_instances=5), "num_instances=5"),
    (np.zeros((4, 2)), dict(META, format_version=2), "format_version"),
])
def test_save_refuses(tmp_path, array, meta, match):
    with pytest.raises(ScoreFileError, match=match):
        save_scores(str(tmp_path / "s"), array, meta)
    assert os.listdir(tmp_path) == []


def test_load_errors_name_the_file(tmp_path):
    p = str(tmp_path / "s")
    with pytest.raises(ScoreFileError, match=r"s\.meta\.json: score meta file not found"):
        load_scores(p)
    save_scores(p, np.ones((3, 2)), META)
    np.save(p + ".npy", np.ones((3, 2), dtype=np.float32))
    with pytest.raises(ScoreFileError, match=r"s\.npy: expected float64"):
        load_scores(p)
    np.save(p + ".npy", np.ones((4, 2)))
    with pytest.raises(ScoreFileError, match="4 rows, but .* num_instances=3"):
        load_scores(p)
    with pytest.raises(ScoreFileError, match="sha256 differs"):
        np.save(p + ".npy", np.zeros((3, 2)))
        load_scores(p, verify_sha256=True)
    with open(p + ".meta.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ScoreFileError, match="not valid JSON"):
        load_scores(p)
    with open(p + ".meta.json", "w") as f:
        json.dump(dict(META, format_version=9, num_instances=3), f)
    with pytest.raises(ScoreFileError, match="format_version 9"):
        load_scores(p)
    os.remove(p + ".npy")
    with pytest.raises(ScoreFileError, match=r"s\.npy: score array not found"):
        load_scores(p)


def test_check_scores_match():
    meta = dict(META, num_instances=10)
    check_scores_match("s", meta, "d", {"fingerprint": META["dataset_fingerprint"], "num_instances": 10})
    with pytest.raises(ScoreFileError, match="another dataset"):
        check_scores_match("s", meta, "d", {"fingerprint": "cd" * 32, "num_instances": 10})
    with pytest.raises(ScoreFileError, match="10 instances scored, but d has 11"):
        check_scores_match("s", meta, "d", {"fingerprint": META["dataset_fingerprint"], "num_instances": 11})
