"""RNG states across device kinds: a checkpoint records which device kind its RNG states are of
(a GPU's CUDA generators, or the CPU generator megatron-core's tracker uses on a CPU). Resumed
on the other kind, the CPU generators are restored and the device ones keep this run's seeding,
with a note, instead of failing at the first draw ("RNG state is wrong size"); --no-load-rng
(Megatron-LM's) restores none.

A GPU's states are made on the CPU by rewriting a saved rank's file: a CUDA generator state is
16 bytes (Philox seed and offset), a CPU one 5056."""

import json
import os

import pytest
import torch

from distributed import run_distributed
from trainer_helpers import args, metrics, train

GPU_STATE_BYTES = 16


def _as_if_saved_on_a_gpu(rng_file, recorded=True):
    """The rank's device states replaced by CUDA-sized ones. ``recorded=False``: a file written
    before the device kind was recorded, known for a GPU's by its CUDA generator state."""
    state = torch.load(rng_file, weights_only=False)
    gpu_state = torch.arange(GPU_STATE_BYTES, dtype=torch.uint8)
    state["cuda"] = gpu_state.clone()
    state["tracker"] = {name: gpu_state.clone() for name in state["tracker"]}
    if recorded:
        state["device"] = "cuda"
    else:
        state.pop("device", None)
    torch.save(state, rng_file)


def _rng_file(save_dir, iteration):
    return os.path.join(save_dir, f"iter_{iteration:07d}", "rng_rank00000.pt")


# ---- through tools/pretrain_gpt.py ----------------------------------------------------------

@pytest.mark.parametrize("recorded,flags", [(True, []), (False, []), (True, ["--no-load-rng"])],
                         ids=["recorded", "unrecorded", "no-load-rng"])
def test_a_gpu_checkpoint_resumes_on_the_cpu(corpus, tmp_path, recorded, flags):
    save, m = str(tmp_path / "ckpt"), tmp_path / "m.jsonl"
    run_distributed(train, 1, args(corpus, "--save", save, iters=2))
    _as_if_saved_on_a_gpu(_rng_file(save, 2), recorded)
    run_distributed(train, 1, args(corpus, "--save", save, "--load", save, "--metrics-file", str(m), *flags,
                                   iters=4))
    assert sorted(metrics(m)) == [3, 4]


# ---- load_checkpoint: what is restored, what keeps this run's seeding, the note ---------------

def _save_and_load(save_dir, out, rewrite, load_rng, here):
    """Save at iteration 0, rewrite the rank's RNG file (``rewrite``: None, 'gpu', 'gpu-unrecorded'),
    draw from every generator, then load with this process taken for a ``here`` machine."""
    import logging
    import random

    import numpy as np
    from megatron.core import tensor_parallel
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_miniplm import parallel, platform
    from megatron_miniplm.training import engine
    from megatron_miniplm.training.checkpoint import load_checkpoint, save_checkpoint
    from presets import get_preset

    parallel.initialize(parallel.ParallelConfig(seed=5))
    config = get_preset("tiny")
    chunks = engine.build_model_chunks(config)
    optimizer = engine.build_optimizer(chunks, engine.OptimizerSettings())
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=10,
        lr_decay_style="constant", start_wd=0.0, end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant")
    save_checkpoint(save_dir, 0, chunks, optimizer, scheduler, {"consumed_samples": 0, "consumed_tokens": 0},
                    config)
    rng_file = _rng_file(save_dir, 0)
    recorded_kind = torch.load(rng_file, weights_only=False).get("device")
    if rewrite:
        _as_if_saved_on_a_gpu(rng_file, recorded=rewrite == "gpu")
    saved = torch.load(rng_file, weights_only=False)

    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():  # this run moves on from what it saved
        torch.rand(3)
    random.random(), np.random.random(), torch.rand(3)
    before = {name: state.clone() for name, state in tracker.get_states().items()}
    cpu_before = torch.get_rng_state()

    notes = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())
    logging.getLogger("megatron_miniplm.training.checkpoint").addHandler(handler)
    platform.rng_device_kind = lambda: here
    load_checkpoint(save_dir, chunks, optimizer, scheduler, load_rng=load_rng)

    after = tracker.get_states()
    with tracker.fork():  # a draw from the tracker's state: fails on a state of the wrong size
        torch.rand(3)
    result = {
        "recorded_kind": recorded_kind,
        "tracker_kept": sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before),
        "tracker_restored": sorted(after) == sorted(saved["tracker"])
                            and all(torch.equal(after[k], saved["tracker"][k]) for k in after),
        "python_restored": random.getstate() == saved["python"],
        "numpy_restored": bool(np.array_equal(np.random.get_state()[1], saved["numpy"][1])),
        "torch_restored": torch.equal(torch.get_rng_state(), saved["torch"]),
        "torch_kept": torch.equal(torch.get_rng_state(), cpu_before),
        "notes": notes,
    }
    with open(out, "w") as f:
        json.dump(result, f)


def _run(tmp_path, rewrite=None, load_rng=True, here="cpu"):
    out = tmp_path / "result.json"
    run_distributed(_save_and_load, 1, str(tmp_path / "ckpt"), str(out), rewrite, load_rng, here)
    return json.loads(out.read_text())


@pytest.mark.parametrize("rewrite", ["gpu", "gpu-unrecorded"])
def test_gpu_states_on_the_cpu_restore_the_cpu_generators_and_keep_the_seeded_tracker(tmp_path, rewrite):
    got = _run(tmp_path, rewrite)
    assert got["python_restored"] and got["numpy_restored"] and got["torch_restored"]
    assert got["tracker_kept"] and not got["tracker_restored"]
    assert len(got["notes"]) == 1
    note = got["notes"][0]
    assert "saved on a GPU, this run is on a CPU" in note and "differ from an uninterrupted run" in note
    assert "iter_0000000" in note


def test_cpu_states_on_a_gpu_keep_its_seeded_tracker(tmp_path):
    """The other direction: a GPU run (its device kind stubbed) loading a CPU checkpoint."""
    got = _run(tmp_path, here="cuda")
    assert got["torch_restored"] and got["tracker_kept"] and not got["tracker_restored"]
    assert len(got["notes"]) == 1 and "saved on a CPU, this run is on a GPU" in got["notes"][0]


def test_the_same_device_kind_restores_everything(tmp_path):
    got = _run(tmp_path)
    assert got["recorded_kind"] == "cpu"
    assert got["python_restored"] and got["numpy_restored"] and got["torch_restored"]
    assert got["tracker_restored"] and got["notes"] == []


def test_no_load_rng_restores_nothing(tmp_path):
    got = _run(tmp_path, "gpu", load_rng=False)
    assert got["tracker_kept"] and got["torch_kept"] and not got["python_restored"]
    assert got["notes"] == []
