"""Megatron-LM's exit conditions: SIGTERM (--exit-signal-handler), a wall-clock budget
(--exit-duration-in-mins) and an iteration multiple (--exit-interval) save a checkpoint and
exit 0; the rerun continues exactly where an uninterrupted run would be."""

import os
import signal
import subprocess
import sys
import time

import pytest

from distributed import run_distributed
from trainer_helpers import TOOL, args, metrics, train

from megatron_miniplm.training.metrics import read as read_metrics

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _torchrun(argv):
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node", "2", TOOL, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _worker(proc, rank):
    import psutil

    deadline = time.time() + 60
    while time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and TOOL in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def test_sigterm_saves_exits_0_and_resumes_exactly(corpus, tmp_path):
    """DP=2, bf16 with the distributed optimizer (the GPU path): SIGTERM reaches rank 1 only;
    both ranks save at the same iteration and exit 0; the rerun's losses equal an
    uninterrupted run's at every later step."""
    iters = 40
    base = args(corpus, "--bf16", "--use-distributed-optimizer", "--exit-signal-handler",
                "--save-interval", "1000", iters=iters)
    full = tmp_path / "full.jsonl"
    proc = _torchrun([*base, "--save", str(tmp_path / "a"), "--metrics-file", str(full)])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

    save, m = str(tmp_path / "b"), tmp_path / "stopped.jsonl"
    argv = [*base, "--save", save, "--load", save, "--metrics-file", str(m)]
    proc = _torchrun(argv)
    worker = _worker(proc, 1)
    deadline = time.time() + 300
    while not (m.exists() and len(metrics(m)) >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    worker.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped_at = max(metrics(m))
    assert 5 <= stopped_at < iters, "the signal must land mid-run"
    assert f"exiting at iteration {stopped_at}: SIGTERM received" in out
    assert (tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text() == str(stopped_at)

    proc = _torchrun(argv)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    want, got = metrics(full), metrics(m)
    assert sorted(got) == list(range(1, iters + 1))
    for it in range(stopped_at + 1, iters + 1):
        assert got[it]["loss"] == want[it]["loss"], it
        assert got[it]["grad_norm"] == want[it]["grad_norm"], it


@pytest.mark.parametrize("flags,stops_at", [
    (["--exit-interval", "4"], 4),
    (["--exit-duration-in-mins", "1e-6"], 1),
])
def test_exit_interval_and_duration_save_and_stop(corpus, tmp_path, flags, stops_at):
    """The exit comes after that iteration's validation, as in Megatron-LM: an exit on a
    validation iteration does not lose the validation."""
    save, m = str(tmp_path / "ckpt"), tmp_path / "m.jsonl"
    run_distributed(train, 1, args(corpus, *flags, "--save", save, "--metrics-file", str(m),
                                   "--valid-data-path", corpus[1], "--eval-interval", str(stops_at),
                                   "--eval-iters", "1", iters=10))
    assert max(metrics(m)) == stops_at
    assert list(read_metrics(m).valid) == [stops_at]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == str(stops_at)


def test_clip_grad_0_turns_clipping_off(corpus, tmp_path):
    """--clip-grad 0 trains (the log copes with a step that reports no grad norm) and the
    updates are no longer clipped (this corpus's grad norms are above 1.0 early on)."""
    runs = {}
    for clip in ("0", "1.0"):
        m = tmp_path / f"m{clip}.jsonl"
        run_distributed(train, 1, args(corpus, "--clip-grad", clip, "--metrics-file", str(m), iters=3))
        runs[clip] = metrics(m)
    assert runs["1.0"][1]["grad_norm"] > 1.0
    assert runs["0"][3]["loss"] != runs["1.0"][3]["loss"]


def test_the_log_line_without_a_grad_norm():
    from megatron_miniplm.training.trainer import Trainer

    lines = []
    fake = type("T", (), {"cfg": type("C", (), {"iterations": 9})(), "flops_per_token": 1.0,
                          "info": type("I", (), {"world_size": 1})(), "peak_flops": None, "writer": None,
                          "_log": lambda self, line: lines.append(line),
                          "_write_metrics": lambda self, *records: None})()
    Trainer._report(fake, {"iteration": 1, "consumed_tokens": 5, "loss": 2.0, "lr": 1e-3,
                           "grad_norm": None}, 100.0, 80.0, 0.1, 1)
    assert "loss 2.0000" in lines[0] and "grad norm" not in lines[0]
    assert "100 tokens/s (80 non-pad)" in lines[0]
