"""A real full filesystem: a size-limited tmpfs (mounting one needs root; skipped otherwise)
holds the outputs, filled with a ballast file to a few sizes. Each tool stops with one line
naming the file and the space, leaves nothing behind, and completes once the ballast is
removed. The injected ENOSPC of the other tests cannot show what the kernel does: buffered
bytes that fail at close, and memory-mapped pages that no block backs (SIGBUS)."""
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from data.conftest import make_records, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 4 << 20


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(mount, leave: int) -> str:
    """A ballast file that leaves `leave` bytes free."""
    path = os.path.join(mount, f"ballast-{uuid.uuid4().hex[:6]}")
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(mount).free - leave))
    return path


def _python(code_or_tool: list, **kwargs):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, *code_or_tool], capture_output=True, text=True, env=env, **kwargs)


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln and not ln.startswith(("INFO:", "WARNING:"))]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_preprocess_on_a_full_filesystem(tmp_path, tmpfs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    records = make_records(600, seed=9)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r["text"] for r in records], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    corpus = write_jsonl(str(tmp_path / "in.jsonl"), records)

    def run(prefix):
        return _python([os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus, "--output-prefix",
                        prefix, "--tokenizer", str(tmp_path), "--no-progress", "--seq-length", "64"])

    assert run(str(tmp_path / "want")).returncode == 0
    want = {s: open(str(tmp_path / "want") + s, "rb").read() for s in (".bin", ".idx", ".domains.npy")}
    size = sum(map(len, want.values()))
    for leave in (0, 4096, size // 2, size - 4096):
        ballast = _fill(tmpfs, leave)
        r = run(str(tmpfs / "ds"))
        assert r.returncode == 1
        line = _one_error_line(r.stderr)
        assert f"error: {tmpfs / 'ds'}" in line and "no space left on the device" in line, line
        assert os.listdir(tmpfs) == [os.path.basename(ballast)], leave
        os.remove(ballast)
    r = run(str(tmpfs / "ds"))
    assert r.returncode == 0, r.stderr
    assert {s: open(str(tmpfs / "ds") + s, "rb").read() for s in want} == want


def test_a_score_file_on_a_full_filesystem(tmpfs):
    """A memory-mapped score file larger than the space left: DiskFullError, not SIGBUS."""
    prefix = str(tmpfs / "scores")
    code = ("import sys, numpy as np; from megatron_miniplm.scoring.score_file import save_scores; "
            "save_scores(sys.argv[1], np.ones((int(sys.argv[2]), 2)), {'dataset_fingerprint': 'f', 'model': {}})")
    rows = SIZE // 32  # 16 bytes a row, after a 128-byte .npy header: half the filesystem
    ballast = _fill(tmpfs, SIZE // 8)
    r = _python(["-c", code, prefix, str(rows)])
    assert r.returncode == 1, (r.returncode, r.stderr[-500:])  # -7: SIGBUS
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"megatron_miniplm.atomic_io.DiskFullError: {prefix}.npy: no space left on the device "
                           f"({rows * 16 + 128:,} bytes needed"), last
    assert os.listdir(tmpfs) == [os.path.basename(ballast)]
    os.remove(ballast)
    r = _python(["-c", code, prefix, str(rows)])
    assert r.returncode == 0, r.stderr
    assert np.load(prefix + ".npy").shape == (rows, 2)
