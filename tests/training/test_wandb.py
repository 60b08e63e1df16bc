"""Weights & Biases logging (--wandb-project): an offline run holds the metrics file's numbers
and the run's config, read back from W&B's own run file; a resumed run continues the same W&B
run, a run started from another run's checkpoint is a new one; without wandb, a one-line
refusal before anything starts."""

import glob
import json
import os
import struct
import sys

import pytest

from distributed import run_distributed
from trainer_helpers import args, train

from megatron_miniplm.training.loggers import scalars
from megatron_miniplm.training.metrics import read as read_metrics

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and quiet, its own files under tmp_path: no network, nothing in $HOME."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                        "WANDB_DISABLE_CODE": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


# A run's .wandb file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version
# 0), then LevelDB-log framing in 32 KiB blocks: chunks of [crc32c: 4][length: 2][type: 1]
# [data], where type FULL (1) holds a whole record and FIRST (2), MIDDLE (3), LAST (4) one
# split across blocks, and a block's tail shorter than a chunk header is zero padding. Each
# record is a wandb.proto Record message.
_BLOCK, _CHUNK_HEADER = 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path):
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    pos, parts = 7, []
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        parts.append(data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length])
        pos += _CHUNK_HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
        else:
            assert kind in (_FIRST, _MIDDLE), kind


def _key(item):
    return item.key or "/".join(item.nested_key)


def read_run(run_dir):
    """(run id, config, history: step -> {name: value}) of one local W&B run directory."""
    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    run_id, config, history = None, {}, {}
    for record in wandb_records(path):
        which = record.WhichOneof("record_type")
        if which == "run":
            run_id = record.run.run_id
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif which == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif which == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(row["_step"], {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")})
    config.pop("_wandb", None)
    return run_id, config, history


def run_dirs(wandb_dir):
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")))


def test_offline_run_holds_the_metrics_files_numbers_and_resumes(corpus, tmp_path, offline, monkeypatch):
    save, wandb_dir, m = tmp_path / "ckpt", tmp_path / "wb", tmp_path / "m.jsonl"
    common = ["--metrics-file", str(m), "--valid-data-path", corpus[1], "--eval-iters", "1",
              "--eval-interval", "3", "--log-interval", "2", "--save", str(save), "--save-interval", "3",
              "--wandb-project", "miniplm-test", "--wandb-exp-name", "student", "--wandb-group", "pipeline-1"]
    # two ranks: rank 0 alone logs, with the run id both save with the checkpoint
    run_distributed(train, 2, args(corpus, *common, "--wandb-save-dir", str(wandb_dir), iters=3))
    (first,) = run_dirs(wandb_dir)
    run_distributed(train, 1, args(corpus, *common, "--wandb-save-dir", str(wandb_dir), "--load", str(save),
                                   iters=6))
    first_again, second = run_dirs(wandb_dir)
    assert first_again == first

    id1, config, history = read_run(first)
    id2, config2, history2 = read_run(second)
    assert id1 and id2 == id1  # the resumed job continues the run
    assert sorted(history) == [1, 2, 3] and sorted(history2) == [4, 5, 6]
    history.update(history2)

    # the run's config is the TrainConfig, as the checkpoint's run_config.json holds it
    (run_config,) = glob.glob(str(save / "iter_0000003" / "run_config.json"))
    with open(run_config) as f:
        assert config == json.load(f)
    assert config["wandb_group"] == "pipeline-1" and config["model"]["hidden_size"] == 64

    # the metrics file's numbers, under the same names as in tensorboard, step = iteration
    written = read_metrics(str(m))
    assert sorted(written.train) == [1, 2, 3, 4, 5, 6]
    assert sorted(written.throughput) == [2, 3, 4, 6] and sorted(written.valid) == [3, 6]
    for it in range(1, 7):
        want = scalars(written.train[it])
        if it in written.throughput:
            want.update(scalars(written.throughput[it]))
        if it in written.valid:
            want.update(scalars(written.valid[it]))
        if it in (3, 6):
            want["checkpoint/iteration"] = it
        assert history[it] == pytest.approx(want, rel=1e-12), it
    assert {"train/loss", "train/lr", "train/grad_norm", "train/consumed_tokens", "train/consumed_flops",
            "train/tokens_per_s", "train/ms_per_iter", "valid/loss"} <= set(history[6])

    # from another run's checkpoint: a new W&B run, in --save's wandb/ directory by default;
    # --wandb-mode offline holds over WANDB_MODE (online would need an API key, and fail here)
    other = tmp_path / "other"
    monkeypatch.setenv("WANDB_MODE", "online")
    run_distributed(train, 1, args(corpus, "--wandb-project", "miniplm-test", "--wandb-mode", "offline",
                                   "--load", str(save), "--save", str(other), iters=7))
    (third,) = run_dirs(other / "wandb")
    id3, _, history3 = read_run(third)
    assert id3 != id1 and sorted(history3) == [7]


def test_without_wandb_a_one_line_refusal_before_anything_starts(corpus, tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    from megatron_miniplm.cli import pretrain_gpt

    if dist.is_initialized():  # a group another test of this process left: this run must not make one
        dist.destroy_process_group()
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"])
    m = tmp_path / "m.jsonl"
    status = pretrain_gpt.main(args(corpus, "--wandb-project", "p", "--metrics-file", str(m),
                                    "--save", str(tmp_path / "ckpt")))
    err = capsys.readouterr().err
    assert status == 1
    assert err.splitlines() == ["pretrain_gpt.py: error: --wandb-project needs the wandb package: "
                                "pip install megatron-miniplm[wandb]"]
    assert not dist.is_initialized() and not m.exists() and not (tmp_path / "ckpt").exists()


def _main_status(argv, out):
    from megatron_miniplm.cli import pretrain_gpt

    status = pretrain_gpt.main(argv)
    with open(f"{out}.{os.environ['RANK']}", "w") as f:
        f.write(str(status))


def test_a_run_w_and_b_cannot_start_is_refused_on_every_rank(corpus, tmp_path, offline, monkeypatch):
    """Online with no API key: rank 0's W&B start fails, and both ranks stop with status 1
    (rank 1 does not wait for rank 0 in the first step)."""
    monkeypatch.setenv("WANDB_MODE", "online")
    out = tmp_path / "status"
    run_distributed(_main_status, 2, args(corpus, "--wandb-project", "p", "--wandb-save-dir", str(tmp_path / "wb"),
                                          "--metrics-file", str(tmp_path / "m.jsonl")), str(out))
    assert [(tmp_path / f"status.{rank}").read_text() for rank in (0, 1)] == ["1", "1"]
    assert not (tmp_path / "m.jsonl").exists()
