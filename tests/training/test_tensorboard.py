"""tensorboard logging (--tensorboard-dir): the event files hold the metrics file's numbers
under the same names as W&B, step = iteration, read back with tensorboard's own reader."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distributed import run_distributed
from trainer_helpers import args, train

from megatron_miniplm.training.loggers import scalars
from megatron_miniplm.training.metrics import read as read_metrics


def read_events(directory) -> dict:
    """step -> {tag: value} of every scalar in a tensorboard log directory."""
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    history = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            history.setdefault(event.step, {})[tag] = event.value
    return history


def test_event_files_hold_the_metrics_files_numbers(corpus, tmp_path):
    board, m = tmp_path / "tb", tmp_path / "m.jsonl"
    # two ranks: rank 0 alone writes events
    run_distributed(train, 2, args(corpus, "--metrics-file", str(m), "--valid-data-path", corpus[1],
                                   "--eval-iters", "1", "--eval-interval", "3", "--log-interval", "2",
                                   "--save", str(tmp_path / "ckpt"), "--save-interval", "3",
                                   "--tensorboard-dir", str(board), iters=4))
    history = read_events(board)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    written = read_metrics(str(m))
    assert sorted(history) == sorted(written.train) == [1, 2, 3, 4]
    for it in history:
        want = scalars(written.train[it])
        if it in written.throughput:
            want.update(scalars(written.throughput[it]))
        if it in written.valid:
            want.update(scalars(written.valid[it]))
        if (tmp_path / "ckpt" / f"iter_{it:07d}").is_dir():  # every 3rd and the last
            want["checkpoint/iteration"] = it
        assert set(history[it]) == set(want), (it, set(history[it]) ^ set(want))
        assert history[it] == pytest.approx(want, rel=1e-6), it  # events hold float32
    assert {"train/loss", "train/lr", "train/grad_norm", "valid/loss"} <= set(history[3])
