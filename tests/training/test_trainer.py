"""tools/pretrain_gpt.py: loss falls, layouts agree, a SIGKILLed run resumes exactly, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from corpus import pattern_instances, write_dataset
from presets import model_flags
from distributed import run_distributed
from trainer_helpers import SEQ, TOOL, VOCAB, args, metrics, parameters_at_tp1, refuses
from trainer_helpers import train as _train

from megatron_miniplm.training.metrics import read as read_metrics


def test_loss_falls(corpus, tmp_path):
    m = tmp_path / "m.jsonl"
    run_distributed(_train, 1, args(corpus, "--metrics-file", str(m), "--valid-data-path", corpus[1],
                                    "--eval-iters", "2", "--lr", "1e-2", "--log-interval", "20",
                                    iters=100))
    losses = metrics(m)
    assert len(losses) == 100
    assert losses[100]["loss"] < 0.6 * losses[1]["loss"]
    valid = [json.loads(l) for l in open(m) if "valid_loss" in l]
    assert valid and valid[-1]["valid_loss"] < 0.7 * losses[1]["loss"]
    # the throughput of each logging window is a record of the file, apart from the iterations'
    windows = read_metrics(str(m)).throughput
    assert sorted(windows) == [20, 40, 60, 80, 100] and all(w["window_iterations"] == 20 for w in windows.values())
    assert all(w["tokens_per_s"] > 0 and w["ms_per_iter"] > 0 for w in windows.values())
    assert all(w["mfu"] is None for w in windows.values())  # a CPU has no peak to measure against


def _layout_losses(corpus, initial_checkpoint, tmp_path, world, *layout):
    m = tmp_path / f"m{world}{'-'.join(layout)}.jsonl"
    run_distributed(_train, world, args(corpus, "--load", initial_checkpoint,
                                        "--metrics-file", str(m), *layout))
    return metrics(m)


def test_dp_tp_pp_match_one_process(corpus, initial_checkpoint, tmp_path):
    ref = _layout_losses(corpus, initial_checkpoint, tmp_path, 1)
    assert len(ref) == 6 and ref[6]["loss"] < ref[1]["loss"]
    for layout in ([], ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]):
        got = _layout_losses(corpus, initial_checkpoint, tmp_path, 2, *layout)
        for it in ref:
            assert abs(got[it]["loss"] - ref[it]["loss"]) < 1e-4, (layout, it)
            assert abs(got[it]["grad_norm"] - ref[it]["grad_norm"]) < 1e-3 * ref[it]["grad_norm"]


def test_sigkill_then_resume_matches_uninterrupted(corpus, tmp_path):
    iters = 60
    base = args(corpus, "--save-interval", "3", iters=iters)
    full = tmp_path / "full.jsonl"
    subprocess.run([sys.executable, TOOL, *base, "--save", str(tmp_path / "a"),
                    "--metrics-file", str(full)], check=True, capture_output=True)
    killed = tmp_path / "killed.jsonl"
    save = str(tmp_path / "b")
    cmd = [sys.executable, TOOL, *base, "--save", save, "--load", save, "--metrics-file", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if killed.exists() and len(metrics(killed)) >= 8:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    seen = metrics(killed)
    assert 8 <= len(seen) < iters, "the kill must land mid-run"
    subprocess.run(cmd, check=True, capture_output=True)
    want, got = metrics(full), metrics(killed)
    assert sorted(got) == list(range(1, iters + 1))
    for it in want:
        assert got[it]["loss"] == pytest.approx(want[it]["loss"], abs=1e-6), it
        assert got[it]["consumed_tokens"] == want[it]["consumed_tokens"]


def test_interrupted_save_leaves_previous_checkpoint(corpus, tmp_path):
    save = tmp_path / "ckpt"
    run_distributed(_train, 1, args(corpus, "--save", str(save), iters=2))
    (save / "iter_0000004.partial").mkdir()  # what a kill during a save leaves
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"  # Megatron-LM's format
    m = tmp_path / "m.jsonl"
    run_distributed(_train, 1, args(corpus, "--save", str(save), "--load", str(save),
                                    "--metrics-file", str(m), iters=4))
    assert sorted(metrics(m)) == [3, 4]  # resumed from iteration 2
    assert not (save / "iter_0000004.partial").exists()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"


@pytest.mark.parametrize("extra,message", [
    (["--global-batch-size", "7"], "not divisible by micro batch size"),
    (["--vocab-size", "100"], "exceeds the model's"),
    (["--sliding-window", "8"], "exceeds the 8-token sliding attention window"),
    (["--data-path", "/nonexistent/prefix"], "meta file not found"),
    (["--num-attention-heads", "4", "--tensor-model-parallel-size", "3"], "does not divide"),
])
def test_clear_errors(corpus, extra, message):
    run_distributed(refuses, 1, [*args(corpus), *extra], message)


def test_document_mode_through_megatron_gpt_dataset(tmp_path):
    """Document-mode data: full seq_length windows across documents, MiniPLM's mask on EOD inputs."""
    from megatron_miniplm.training.data import SampleStream

    docs = pattern_instances(60, VOCAB, 20, seed=3)
    prefix = write_dataset(str(tmp_path / "docs"), docs, VOCAB, SEQ, mode="document")
    stream = SampleStream.from_data_path([prefix], seed=1, num_samples=16, seq_length=SEQ)
    stream_again = SampleStream.from_data_path([prefix], seed=1, num_samples=16, seq_length=SEQ)
    all_tokens = set(int(t) for d in docs for t in d)
    for i in range(16):
        window = stream[i]
        assert len(window) == SEQ + 1
        assert set(window.tolist()) <= all_tokens
        assert (window == stream_again[i]).all()  # deterministic from the seed
    assert sum((stream[i] == 0).sum() for i in range(16)) > 0  # windows cross document ends
    m = tmp_path / "m.jsonl"
    run_distributed(_train, 1, [*model_flags("tiny"), "--data-path", prefix, "--seq-length",
                                str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
                                "--train-iters", "3", "--metrics-file", str(m)])
    assert sorted(metrics(m)) == [1, 2, 3]


def test_pipeline_stages_from_scratch_are_distinct(corpus, tmp_path):
    """PP=2 from scratch: no tensor of stage 1 starts as a (scaled) copy of a tensor of stage 0.
    With one seed on every stage, stage 1's first layer repeats the draws of stage 0's
    embedding, scaled by the init std."""
    import torch

    save = str(tmp_path / "pp2")
    run_distributed(_train, 2, args(corpus, *model_flags("tiny-untied"), "--save", save,
                                    "--pipeline-model-parallel-size", "2", iters=0))
    out = str(tmp_path / "values.pt")
    run_distributed(parameters_at_tp1, 1, {save: out}, 256)
    values = torch.load(out)
    stage1 = {k: v for k, v in values.items() if "layers.2." in k or "layers.3." in k or "output_layer" in k}
    stage0 = {k: v for k, v in values.items() if k not in stage1}
    assert stage1 and any("embedding" in k for k in stage0)
    for k1, v1 in stage1.items():
        if v1.std() == 0:  # norms start at one, biases at zero on every stage
            continue
        for k0, v0 in stage0.items():
            if v0.std() == 0:
                continue
            corr = torch.corrcoef(torch.stack([v1, v0]))[0, 1].abs().item()
            assert corr < 0.5, f"{k1} (stage 1) starts as a copy of {k0} (stage 0): correlation {corr:.3f}"


def test_data_cache_path_keeps_the_data_directory_untouched(tmp_path):
    """Document-mode data on two ranks: megatron's GPTDataset index is built once (rank 0) into
    --data-cache-path and read there by the other rank; nothing is written beside the data,
    so a read-only data directory works. Without the flag the cache goes beside the data, as
    in Megatron-LM."""
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    data_dir.mkdir()
    prefix = write_dataset(str(data_dir / "docs"), pattern_instances(60, VOCAB, 20, seed=3), VOCAB, SEQ,
                           mode="document")
    before = sorted(os.listdir(data_dir))
    common = [*model_flags("tiny"), "--data-path", prefix, "--seq-length", str(SEQ),
              "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2"]
    run_distributed(_train, 2, [*common, "--data-cache-path", str(cache)])
    assert sorted(os.listdir(data_dir)) == before
    built = [f for _, _, files in os.walk(cache) for f in files]
    assert any(f.endswith("document_index.npy") for f in built), built
    run_distributed(_train, 1, common)
    assert os.path.isdir(os.path.join(prefix, "cache"))  # megatron-core's default: PREFIX/cache/
