"""Megatron-LM's memory and host-side flags change nothing in the numbers."""

import gc

import pytest

from distributed import run_distributed
from trainer_helpers import args, metrics, refuses, train


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
    ["--log-interval", "4"],  # losses read on the host every 4 steps (and at the end), not every step
    ["--no-keep-freed-memory"],  # glibc's own heap thresholds
])
def test_same_losses_and_gradients(corpus, initial_checkpoint, plain_run, tmp_path, flags):
    other = tmp_path / "other.jsonl"
    run_distributed(train, 1, args(corpus, "--load", initial_checkpoint, "--metrics-file", str(other), *flags))
    want, got = plain_run, metrics(other)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for it in want:
        assert got[it]["loss"] == want[it]["loss"], it
        assert got[it]["grad_norm"] == want[it]["grad_norm"], it


def _count_host_reads(argv, out):
    """Train, counting the tensor reads (``item``/``tolist``, each a host sync on a GPU) that the
    trainer and the training engine make."""
    import json
    import sys

    import torch

    counted = ("megatron_miniplm/training/trainer.py", "megatron_miniplm/training/engine.py")
    calls = []

    def counting(original):
        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(counted):
                calls.append(caller)
            return original(self, *a, **k)
        return read

    item, tolist = torch.Tensor.item, torch.Tensor.tolist
    torch.Tensor.item, torch.Tensor.tolist = counting(item), counting(tolist)
    try:
        train(argv)
    finally:
        torch.Tensor.item, torch.Tensor.tolist = item, tolist
    with open(out, "w") as f:
        json.dump(len(calls), f)


def test_losses_are_read_at_the_logging_interval_only(corpus, tmp_path):
    """12 steps, a log line every 4: three reads of the steps' values, not one per step."""
    import json

    out = tmp_path / "reads.json"
    run_distributed(_count_host_reads, 1, args(corpus, "--log-interval", "4", iters=12), str(out))
    assert json.load(open(out)) == 3


def _train_recording_host_memory(argv, out):
    """Train, recording whether the trainer asked glibc to keep freed memory."""
    import json

    from megatron_miniplm import host_memory

    original, calls = host_memory.keep_freed, []
    host_memory.keep_freed = lambda: calls.append(1) or original()
    try:
        train(argv)
    finally:
        host_memory.keep_freed = original
    with open(out, "w") as f:
        json.dump(bool(calls), f)


@pytest.mark.parametrize("flags,kept", [([], True), (["--no-keep-freed-memory"], False)])
def test_a_cpu_run_keeps_freed_host_memory_unless_told_not_to(corpus, tmp_path, flags, kept):
    import json

    out = tmp_path / "kept.json"
    run_distributed(_train_recording_host_memory, 1, args(corpus, *flags, iters=1), str(out))
    assert json.load(open(out)) is kept


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
    from megatron_miniplm.cli import pretrain_gpt
    from megatron_miniplm.models.gpt import transformer_config
    from megatron_miniplm.settings import from_args
    from megatron_miniplm.training.config import TrainConfig

    parsed = pretrain_gpt.build_parser().parse_args(args(corpus, "--recompute-granularity", "full",
                                                         "--recompute-method", "block", "--recompute-num-layers", "1"))
    cfg = from_args(TrainConfig, parsed, model=pretrain_gpt.model_config_from_args(parsed, 512))
    tcfg = transformer_config(cfg.model, recompute=cfg.recompute)
    assert (tcfg.recompute_granularity, tcfg.recompute_method, tcfg.recompute_num_layers) == ("full", "block", 1)


def test_the_kernel_flags_reach_the_model(corpus):
    """--attention-backend, --cross-entropy-loss-fusion and --sequence-parallel as megatron-core
    gets them (the CPU resolves Megatron-LM's TE defaults to the local layers)."""
    from megatron_miniplm import parallel
    from megatron_miniplm.cli import pretrain_gpt
    from megatron_miniplm.models.attention import FlashSDPAttention
    from megatron_miniplm.models.gpt import build_model, resolve_implementation
    from megatron_miniplm.settings import from_args
    from megatron_miniplm.training.config import TrainConfig

    parsed = pretrain_gpt.build_parser().parse_args(args(corpus, "--attention-backend", "flash", "--bf16",
                                                         "--cross-entropy-loss-fusion", "--sequence-parallel"))
    cfg = from_args(TrainConfig, parsed, model=pretrain_gpt.model_config_from_args(parsed, 512))
    assert cfg.sequence_parallel and cfg.layers.attention_backend == "flash"
    parallel.initialize(parallel.ParallelConfig(seed=1))
    model = build_model(cfg.model, impl=resolve_implementation(cfg.layers, cfg.fusions))
    assert model.config.cross_entropy_loss_fusion and model.config.cross_entropy_fusion_impl == "native"
    assert not model.config.sequence_parallel  # TP 1: off, as in Megatron-LM
    core = model.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, FlashSDPAttention)


def test_fused_cross_entropy_follows_the_unfused_loss(corpus, initial_checkpoint, tmp_path):
    """megatron-core's native fused cross entropy (jit-compiled) under bf16: the same losses
    and gradient norms as the unfused vocabulary-parallel loss, up to compiled-kernel rounding."""
    runs = {}
    for name, extra in (("unfused", []), ("fused", ["--cross-entropy-loss-fusion"])):
        path = tmp_path / f"{name}.jsonl"
        run_distributed(train, 1, args(corpus, "--load", initial_checkpoint, "--bf16", "--metrics-file", str(path),
                                       *extra))
        runs[name] = metrics(path)
    want, got = runs["unfused"], runs["fused"]
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for it in want:
        assert got[it]["loss"] == pytest.approx(want[it]["loss"], abs=1e-4), it
        assert got[it]["grad_norm"] == pytest.approx(want[it]["grad_norm"], rel=1e-3), it


@pytest.mark.parametrize("flags,message", [
    (["--cross-entropy-loss-fusion"], "needs --bf16"),
    (["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te", "--bf16"], "needs Transformer Engine"),
    (["--attention-backend", "fused"], "cuDNN attention"),
])
def test_kernel_refusals(corpus, flags, message):
    run_distributed(refuses, 1, args(corpus, *flags, iters=1), message)
