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


def _save_tiny_checkpoint(save_dir: str, out: str) -> None:
    """One rank: a tiny model's checkpoint at iteration 0; `out` gets the error, if any."""
    import json

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_miniplm import parallel
    from megatron_miniplm.training import engine
    from megatron_miniplm.training.checkpoint import save_checkpoint
    from presets import get_preset

    parallel.initialize(parallel.ParallelConfig(seed=5))
    config = get_preset("tiny")
    chunks = engine.build_model_chunks(config)
    optimizer = engine.build_optimizer(chunks, engine.OptimizerSettings())
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=10,
        lr_decay_style="constant", start_wd=0.0, end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant")
    try:
        save_checkpoint(save_dir, 0, chunks, optimizer, scheduler, {"consumed_samples": 0, "consumed_tokens": 0},
                        config)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001  (reported to the test)
        result = {"error": type(e).__name__, "message": str(e)}
    with open(out, "w") as f:
        json.dump(result, f)


def test_a_checkpoint_save_on_a_full_filesystem(tmp_path, tmpfs):
    import json

    from distributed import run_distributed
    from megatron_miniplm.dist_checkpoint import latest_checkpoint

    save_dir, out = str(tmpfs / "ckpt"), str(tmp_path / "result.json")
    ballast = _fill(tmpfs, 64 << 10)
    run_distributed(_save_tiny_checkpoint, 1, save_dir, out)
    result = json.load(open(out))
    assert result["error"] == "DiskFullError", result
    assert result["message"].startswith(f"{save_dir}/iter_0000000.partial: no space left on the device"), result
    assert latest_checkpoint(save_dir) is None  # nothing a resume would load
    os.remove(ballast)
    run_distributed(_save_tiny_checkpoint, 1, save_dir, out)
    assert json.load(open(out)) == {"error": None}
    assert latest_checkpoint(save_dir) == os.path.join(save_dir, "iter_0000000")
    assert sorted(os.listdir(save_dir)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]


def test_a_failed_write_is_put_down_to_a_full_disk_only_when_it_is_one(tmp_path):
    """Writers that lose the errno (torch's zip writer: "unexpected pos") are judged by the
    space left; an ENOSPC anywhere among the causes decides at once."""
    import errno

    from megatron_miniplm.atomic_io import space_ran_out

    lost = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    free = shutil.disk_usage(tmp_path).free
    assert space_ran_out(lost, str(tmp_path), needed=free + (1 << 30))
    assert not space_ran_out(lost, str(tmp_path), needed=1)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert space_ran_out(wrapped, str(tmp_path), needed=1)
