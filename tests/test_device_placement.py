"""Where tensors live, seen on a CPU: the device stood in by ``meta``.

On a CPU every device is the host, so a tensor left there by mistake is invisible; on a
GPU it stops the first step. Here the platform layer's device (megatron-core's current
device, ``platform.device()``, where inputs are sent) is the ``meta`` device, and every
model the tools build is followed to its first forward pass: the trainer (fp32 and bf16,
with and without the distributed optimizer, and with a Vanilla KD teacher), the scorer, the
evaluator's LM loss and the conversion's models. At that forward every parameter, buffer
and input of the model must be on the device; the run stops there (meta tensors hold no
values). Collectives see a world of one, so they are skipped for meta tensors, and
checkpoint loads (which fill the model's tensors in place, where they are; meta tensors
cannot be read into) leave the model as built.
"""

from __future__ import annotations

import importlib
import os

import pytest

from corpus import pattern_instances, write_dataset
from distributed import run_distributed
from presets import model_flags

SEQ, VOCAB = 32, 512


class ReachedForward(Exception):
    """Raised at a model's first forward pass, with what was not on the device."""


def _stand_in_device(skip_loads: bool = True) -> list:
    """Make ``meta`` this process's device; returns the list the forward hook reports into."""
    import torch
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel

    from megatron_miniplm import megatron_compat, platform

    meta = torch.device("meta")
    megatron_compat.apply()
    platform.NO_CUDA_DEVICE = meta  # megatron-core's current device and platform.device()
    for name in ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather"):
        real = getattr(dist, name)

        def skip_meta(*args, __real=real, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, list) for t in a if torch.is_tensor(t)]
            if any(t.is_meta for t in tensors):
                return None  # a world of one: nothing to exchange
            return __real(*args, **kwargs)

        setattr(dist, name, skip_meta)
    from megatron_miniplm import dist_checkpoint

    if skip_loads:
        dist_checkpoint.load_model = lambda model_chunks, directory: None  # fills tensors in place, where they are
    reports: list = []

    def check(module, *args, **kwargs):
        named = [*module.named_parameters(), *module.named_buffers()]
        named += [(f"input {i}", a) for i, a in enumerate(args)]
        named += [(f"input {k}", a) for k, a in kwargs.items()]
        off = sorted(f"{n} ({t.device})" for n, t in named if torch.is_tensor(t) and t.device != meta)
        reports.append(off)
        raise ReachedForward("; ".join(off) or "all on the device")

    GPTModel.forward = check
    return reports


def _run_until_forward(fn, out: str, *args) -> None:
    """``fn(*args)`` with the stand-in device, until a model's first forward; what was off the
    device is written to ``out`` (one line per forward reached, empty when all was there)."""
    reports = _stand_in_device()
    try:
        fn(*args)
    except ReachedForward:
        pass
    finally:
        from megatron_miniplm import parallel

        parallel.destroy()
    assert reports, "no model forward was reached"
    with open(out, "w") as f:
        f.write("\n".join("; ".join(r) for r in reports))


def _tool(name: str, argv: list) -> None:
    importlib.import_module(f"megatron_miniplm.cli.{name}").main(argv)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    train = write_dataset(str(root / "train"), pattern_instances(64, VOCAB, SEQ + 1, seed=1), VOCAB, SEQ)
    return root, train


def _placed(tmp_path, fn, *args) -> str:
    out = str(tmp_path / "placement.txt")
    run_distributed(_run_until_forward, 1, fn, out, *args)
    return open(out).read()


@pytest.mark.parametrize("flags", [[], ["--use-distributed-optimizer"], ["--bf16"],
                                   ["--bf16", "--use-distributed-optimizer"]],
                         ids=["fp32", "fp32-distopt", "bf16", "bf16-distopt"])
def test_the_trainers_model_and_inputs_are_on_the_device(data, tmp_path, flags):
    root, train = data
    argv = [*model_flags("tiny"), "--data-path", train, "--seq-length", str(SEQ), "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3", *flags]
    assert _placed(tmp_path, _tool, "pretrain_gpt", argv) == ""


def _save_checkpoint(directory: str, data_prefix: str) -> None:
    """A tiny model at TP=1 (ordinary CPU run) with the dataset's tokenizer recorded."""
    import json

    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import save_model
    from megatron_miniplm.models.gpt import build_model
    from presets import get_preset

    parallel.initialize(parallel.ParallelConfig(seed=3))
    config = get_preset("tiny").replace(vocab_size=VOCAB)
    os.makedirs(directory)
    save_model([build_model(config)], directory, config)
    tokenizer = json.load(open(data_prefix + ".meta.json"))["tokenizer"]
    with open(os.path.join(directory, "checkpoint_info.json"), "w") as f:
        json.dump({"format_version": 1, "tokenizer": tokenizer}, f)


@pytest.fixture(scope="module")
def checkpoint(data):
    root, train = data
    run_distributed(_save_checkpoint, 1, str(root / "ckpt"), train)
    return str(root / "ckpt")


@pytest.mark.parametrize("flags", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_the_scorers_model_and_inputs_are_on_the_device(data, checkpoint, tmp_path, flags):
    _, train = data
    argv = ["--data-path", train, "--load", checkpoint, "--output-prefix", str(tmp_path / "scores"),
            "--micro-batch-size", "2", "--no-progress", *flags]
    assert _placed(tmp_path, _tool, "score_docs", argv) == ""


def test_the_evaluators_model_and_inputs_are_on_the_device(data, checkpoint, tmp_path):
    _, train = data
    argv = ["--load", checkpoint, "--data-path", train, "--output-dir", str(tmp_path / "eval")]
    assert _placed(tmp_path, _tool, "evaluate", argv) == ""


def test_the_kd_teachers_model_and_inputs_are_on_the_device(data, checkpoint, tmp_path):
    """The teacher's forward comes first in a KD step: it is the one checked."""
    root, train = data
    argv = [*model_flags("tiny"), "--data-path", train, "--seq-length", str(SEQ), "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3", "--kd-teacher-load", checkpoint]
    assert _placed(tmp_path, _tool, "pretrain_gpt", argv) == ""


def _convert_with_stand_in(hf_dir: str, save: str, exported: str) -> None:
    """Conversion with the stand-in device; checkpoint writes and reads run on the host (their
    scratch tensors are megatron-core's, on its current device), after the model's tensors are
    checked to be there."""
    import torch

    from megatron_miniplm import dist_checkpoint, platform

    _stand_in_device(skip_loads=False)
    meta = platform.NO_CUDA_DEVICE

    def on_host(fn):
        def run(model_chunks, directory, *args):
            off = [n for c in model_chunks for n, t in c.state_dict().items() if torch.is_tensor(t) and t.is_meta]
            assert not off, f"conversion's model on the device: {off[:4]}"
            platform.NO_CUDA_DEVICE = torch.device("cpu")
            try:
                return fn(model_chunks, directory, *args)
            finally:
                platform.NO_CUDA_DEVICE = meta
        return run

    dist_checkpoint.save_model = on_host(dist_checkpoint.save_model)
    dist_checkpoint.load_model = on_host(dist_checkpoint.load_model)
    _tool("convert_checkpoint", ["--direction", "hf-to-megatron", "--load", hf_dir, "--save", save])
    _tool("convert_checkpoint", ["--direction", "megatron-to-hf", "--load", save, "--save", exported])


def test_conversion_keeps_whole_models_on_the_host(tmp_path):
    """Conversion works on whole tensors: on the host, whatever the process's device, so a
    model larger than one accelerator converts, and the checkpoint holds real values."""
    import torch
    from safetensors.torch import load_file

    from conversion.tiny_hf_models import save_hf

    model = save_hf("qwen1.5", str(tmp_path / "hf"))
    run_distributed(_convert_with_stand_in, 1, str(tmp_path / "hf"), str(tmp_path / "meg"), str(tmp_path / "back"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(back[name], value, rtol=0, atol=0)
