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


@pytest.mark.parametrize("precision", [[], ["--bf16", "--use-distributed-optimizer"]], ids=["fp32", "bf16"])
def test_sequence_parallel_follows_tensor_parallel(corpus, initial_checkpoint, tmp_path, precision):
    common = ["--load", initial_checkpoint, *precision]
    plain, plain_save = _run(corpus, tmp_path, "tp2", *common)
    sp, sp_save = _run(corpus, tmp_path, "tp2-sp", *common, "--sequence-parallel")
    assert sorted(sp) == sorted(plain) == list(range(1, 7))
    # fp32: the same sums in another order (reduce-scatter + all-gather instead of all-reduce);
    # bf16: activations rounded at other points
    loss_tol, norm_tol, weight_tol = (1e-5, 1e-4, 1e-5) if not precision else (2e-2, 5e-2, 2e-2)
    for it in plain:
        assert sp[it]["loss"] == pytest.approx(plain[it]["loss"], abs=loss_tol), it
        assert sp[it]["grad_norm"] == pytest.approx(plain[it]["grad_norm"], rel=norm_tol), it
    run_distributed(parameters_at_tp1, 1, {plain_save: str(tmp_path / "plain.pt"), sp_save: str(tmp_path / "sp.pt")})
    want, got = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "sp.pt")
    assert any("layernorm" in k for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=weight_tol, msg=key)


def test_sequence_length_must_split_over_tp(corpus):
    import subprocess
    import sys

    from trainer_helpers import TOOL

    argv = args(corpus, *TP2, "--sequence-parallel", iters=1)
    argv[argv.index("--seq-length") + 1] = "31"
    out = subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True)
    assert out.returncode != 0 and "not divisible by 2" in out.stderr, out.stderr[-2000:]
