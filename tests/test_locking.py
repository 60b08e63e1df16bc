"""One writer per output: a tool writing an output that another process is writing is refused
at once, naming the holder; once the holder is gone (SIGKILL included), the next one goes on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time; from megatron_miniplm.locking import hold_output; "
        "hold_output(sys.argv[1], 'x'); print('held', flush=True); time.sleep(120)")


def _tool(tmp_path, argv):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", argv[0]), *argv[1:]], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


WRITERS = [  # (the output's flag, the command before it, what is locked: the output, a suffix it needs, a prefix in it)
    ("--output-prefix", ["preprocess_data.py", "--input", "IN.jsonl", "--tokenizer", "TOK", "--output-prefix"], ""),
    ("--output-prefix", ["score_docs.py", "--data-path", "DATA", "--load", "CKPT", "--output-prefix"], ""),
    ("--save", ["pretrain_gpt.py", "--data-path", "DATA", "--seq-length", "32", "--micro-batch-size", "1",
                "--global-batch-size", "1", "--train-iters", "1", "--lr", "0.001", "--save"], ""),
    ("--save", ["convert_checkpoint.py", "--direction", "hf-to-megatron", "--load", "CKPT", "--save"], ""),
    ("--output-prefix", ["difference_sample.py", "--data-path", "DATA", "--teacher-scores", "T", "--reference-scores",
                         "R", "--alpha", "0.5", "--output-prefix"], ""),
    ("--report", ["difference_sample.py", "--data-path", "DATA", "--teacher-scores", "T", "--reference-scores", "R",
                  "--alpha", "0.5", "--output-prefix", "BLEND", "--report"], ""),
    ("--output-prefix", ["generate_corpus.py", "--data-path", "DATA", "--load", "CKPT", "--output-prefix"], ""),
    ("--ref-prefix", ["split_dataset.py", "--input-prefix", "DATA", "--rest-prefix", "REST", "--ref-tokens", "10",
                      "--ref-prefix"], ""),
    ("--rest-prefix", ["split_dataset.py", "--input-prefix", "DATA", "--ref-prefix", "REF", "--ref-tokens", "10",
                       "--rest-prefix"], ""),
    ("--output", ["export_selection.py", "--blend", "BLEND", "--output"], ".jsonl"),
    ("--json", ["evaluate.py", "--load", "CKPT", "--data-path", "DATA", "--json"], ".json"),
    ("--report-dir", ["evaluate.py", "--load", "CKPT", "--data-path", "DATA", "--report-dir"], ""),
    # the score files of each checkpoint: OUTPUT_DIR/LABEL-TEST (a label is the checkpoint's name)
    ("--output-dir", ["evaluate.py", "--load", "CKPT", "--data-path", "DATA", "--output-dir"], "/CKPT-DATA"),
]


@pytest.mark.parametrize("flag,argv,held", WRITERS, ids=[f"{argv[0][:-3]}{flag}" for flag, argv, _ in WRITERS])
def test_a_second_writer_of_an_output_is_refused_naming_the_holder(tmp_path, flag, argv, held):
    output = str(tmp_path / "out" / "x") + (held if held.startswith(".") else "")
    locked = output + (held if held.startswith("/") else "")
    shown = f"{output} ({os.path.basename(locked)})" if locked != output else output
    argv = [str(tmp_path / a) if a.isupper() or a.endswith(".jsonl") else a for a in argv] + [output]
    argv[0] = os.path.basename(argv[0])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, locked], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = _tool(tmp_path, argv)
        assert refused.returncode == 1, refused.stderr[-2000:]
        line = refused.stderr.strip().splitlines()[-1]
        assert f"error: {flag} {shown}: in use by another tool (host {socket.gethostname()}, pid {holder.pid}, " \
               f"started 20" in line, line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_killed_holders_lock_goes_with_it(tmp_path):
    """The lock is the holder's open file: killed, it holds nothing, and the tool goes on to its
    next refusal (the same for every writer above: one tool shows it)."""
    output = str(tmp_path / "out" / "x")
    argv = ["preprocess_data.py", "--input", str(tmp_path / "IN.jsonl"), "--tokenizer", str(tmp_path / "TOK"),
            "--output-prefix", output]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, output], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert "in use by another tool" in _tool(tmp_path, argv).stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    after = _tool(tmp_path, argv)
    assert after.returncode in (1, 2) and "in use" not in after.stderr, after.stderr[-2000:]
    assert "not found" in after.stderr or "no such file" in after.stderr, after.stderr[-2000:]


def test_a_tool_leaves_no_lock_file_and_a_removed_lock_file_is_not_shared(tmp_path):
    """The runner removes an output's lock file when the tool ends, however it ends (here a
    refusal after the lock is taken); a process that opened the removed file takes the new one
    instead, so it never shares the lock with the next holder."""
    import fcntl

    from megatron_miniplm import locking

    output = str(tmp_path / "out" / "x")
    done = _tool(tmp_path, ["preprocess_data.py", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer",
                            str(tmp_path / "TOK"), "--output-prefix", output])
    assert done.returncode in (1, 2) and "in use" not in done.stderr, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == [], os.listdir(tmp_path / "out")

    path = output + locking.LOCK_SUFFIX
    stale = os.open(path, os.O_RDWR | os.O_CREAT)  # opened before its holder removed it
    os.unlink(path)
    fd = locking.take(path, "x")
    try:
        assert os.fstat(fd).st_ino == os.stat(path).st_ino != os.fstat(stale).st_ino
        fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed file locks nothing that counts
        with pytest.raises(locking.InUse):
            locking.take(path, "x")
    finally:
        os.close(stale)
        os.close(fd)
