"""Megatron-LM's memory and host-side flags change nothing in the numbers."""

import gc

import pytest

from distributed import run_distributed
from trainer_helpers import args, metrics, train


@pytest.fixture(scope="module")
def plain_run(corpus, initial_checkpoint, tmp_path_factory):
    """The metrics of a run with none of the flags, shared by the comparisons."""
    path = tmp_path_factory.mktemp("plain") / "plain.jsonl"
    run_distributed(train, 1, args(corpus, "--load", initial_checkpoint, "--metrics-file", str(path)))
    return metrics(path)


@pytest.mark.parametrize("flags", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "selective"],
    ["--manual-gc", "--manual-gc-interval", "2"],
    ["--num-workers", "0"],  # the default builds the next batch ahead, in a thread
])
def test_same_losses_and_gradients(corpus, initial_checkpoint, plain_run, tmp_path, flags):
    other = tmp_path / "other.jsonl"
    run_distributed(train, 1, args(corpus, "--load", initial_checkpoint, "--metrics-file", str(other), *flags))
    want, got = plain_run, metrics(other)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for it in want:
        assert got[it]["loss"] == want[it]["loss"], it
        assert got[it]["grad_norm"] == want[it]["grad_norm"], it


def _train_with_manual_gc(argv, out):
    import json

    train(argv)
    with open(out, "w") as f:
        json.dump({"enabled_after": gc.isenabled()}, f)


def test_manual_gc_restores_the_collector(corpus, tmp_path):
    import json

    out = tmp_path / "gc.json"
    run_distributed(_train_with_manual_gc, 1, args(corpus, "--manual-gc", iters=2), str(out))
    assert json.load(open(out))["enabled_after"] is True


@pytest.mark.parametrize("flags,message", [
    (["--recompute-granularity", "full"], "needs --recompute-method and --recompute-num-layers"),
    (["--recompute-method", "uniform"], "go with --recompute-granularity full"),
])
def test_recompute_refusals(corpus, flags, message):
    import subprocess
    import sys

    from trainer_helpers import TOOL

    out = subprocess.run([sys.executable, TOOL, *args(corpus, *flags, iters=1)], capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def test_the_flags_reach_megatron_cores_config(corpus):
    import os
    import sys

    from megatron_miniplm.models.gpt import transformer_config
    from megatron_miniplm.settings import from_args
    from megatron_miniplm.training.trainer import TrainConfig
    from trainer_helpers import TOOL

    sys.path.insert(0, os.path.dirname(TOOL))
    import pretrain_gpt

    parsed = pretrain_gpt.build_parser().parse_args(args(corpus, "--recompute-granularity", "full",
                                                         "--recompute-method", "block", "--recompute-num-layers", "1"))
    cfg = from_args(TrainConfig, parsed, model=pretrain_gpt.model_config_from_args(parsed, 512))
    tcfg = transformer_config(cfg.model, recompute=cfg.recompute)
    assert (tcfg.recompute_granularity, tcfg.recompute_method, tcfg.recompute_num_layers) == ("full", "block", 1)
