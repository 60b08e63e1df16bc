"""Sequence parallelism on the local layers (the TE-less path, run here on the CPU): at TP=2
the run with --sequence-parallel follows the one without, step for step, and ends at the same
weights. The norm weights' gradients are partial sums over each rank's slice of the sequence:
if they were not all-reduced over the TP group, the first step would already differ."""

import pytest
import torch

from distributed import run_distributed
from trainer_helpers import args, metrics, parameters_at_tp1, train

TP2 = ["--tensor-model-parallel-size", "2"]


def _run(corpus, tmp_path, name, *extra):
    m, save = tmp_path / f"{name}.jsonl", str(tmp_path / name)
    run_distributed(train, 2, args(corpus, "--metrics-file", str(m), "--save", save, *TP2, *extra))
    return metrics(m), save


def test_sequence_parallel_follows_tensor_parallel(corpus, initial_checkpoint, tmp_path):
    """fp32, so that the tolerances can be tight: a bf16 run's rounding would hide a missing
    reduction of the norms' gradients."""
    common = ["--load", initial_checkpoint]
    plain, plain_save = _run(corpus, tmp_path, "tp2", *common)
    sp, sp_save = _run(corpus, tmp_path, "tp2-sp", *common, "--sequence-parallel")
    assert sorted(sp) == sorted(plain) == list(range(1, 7))
    # the same sums in another order (reduce-scatter + all-gather instead of all-reduce)
    for it in plain:
        assert sp[it]["loss"] == pytest.approx(plain[it]["loss"], abs=1e-5), it
        assert sp[it]["grad_norm"] == pytest.approx(plain[it]["grad_norm"], rel=1e-4), it
    run_distributed(parameters_at_tp1, 1, {plain_save: str(tmp_path / "plain.pt"), sp_save: str(tmp_path / "sp.pt")})
    want, got = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "sp.pt")
    assert any("layernorm" in k for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)


def test_sequence_length_must_split_over_tp(corpus):
    import subprocess
    import sys

    from trainer_helpers import TOOL

    argv = args(corpus, *TP2, "--sequence-parallel", iters=1)
    argv[argv.index("--seq-length") + 1] = "31"
    out = subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True)
    assert out.returncode != 0 and "not divisible by 2" in out.stderr, out.stderr[-2000:]


def _train_config(*extra, model="tiny-moe"):
    """The trainer's config from tools/pretrain_gpt.py's flags (no data read)."""
    from presets import get_preset, model_flags

    from megatron_miniplm.cli.pretrain_gpt import build_parser
    from megatron_miniplm.settings import from_args
    from megatron_miniplm.training.config import TrainConfig

    argv = [*model_flags("tiny"), "--data-path", "unread", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "1", "--lr", "1e-3", *extra]
    return from_args(TrainConfig, build_parser().parse_args(argv), model=get_preset(model))


def test_experts_at_tp_need_sequence_parallelism():
    with pytest.raises(ValueError, match=r"a mixture-of-experts model \(--num-experts 4\) at "
                                         r"--tensor-model-parallel-size 2 needs --sequence-parallel"):
        _train_config(*TP2)
    assert _train_config(*TP2, "--sequence-parallel").sequence_parallel
    assert _train_config(*TP2, model="tiny").tensor_model_parallel_size == 2  # a dense model needs no SP


def test_expert_parallel_training_is_refused():
    with pytest.raises(ValueError, match=r"expert_model_parallel_size \(--expert-model-parallel-size\) 2: training "
                                         r"keeps every expert on each rank"):
        _train_config("--expert-model-parallel-size", "2")
    assert _train_config("--expert-model-parallel-size", "1").expert_model_parallel_size == 1
