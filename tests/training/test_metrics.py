"""The metrics file: a resumed run's re-run iterations win, a line cut by a kill at the end is
ignored, a bad line elsewhere is an error that names the file and line."""

import json

import pytest

from megatron_miniplm.training import metrics


def test_last_line_of_an_iteration_wins_and_validation_is_apart(tmp_path):
    path = str(tmp_path / "m.jsonl")
    metrics.append(path, [{"iteration": 1, "loss": 5.0}, {"iteration": 2, "loss": 4.0},
                          {"iteration": 2, "valid_loss": 4.5}])
    # resumed from the checkpoint at 1: iteration 2 again, then 3
    metrics.append(path, [{"iteration": 2, "loss": 3.9}, {"iteration": 3, "loss": 3.5}])
    m = metrics.read(path)
    assert {it: r["loss"] for it, r in m.train.items()} == {1: 5.0, 2: 3.9, 3: 3.5}
    assert {it: r["valid_loss"] for it, r in m.valid.items()} == {2: 4.5}


def test_cut_last_line_ignored_bad_line_elsewhere_named(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"iteration": 1, "loss": 5.0})
    path.write_text(good + "\n" + '{"iteration": 2, "lo')
    assert list(metrics.read(str(path)).train) == [1]
    path.write_text(good + "\n" + '{"iteration": 2, "lo\n' + good + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not a JSON line"):
        metrics.read(str(path))
