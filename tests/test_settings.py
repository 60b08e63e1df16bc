"""One declaration per setting: every tool's flags come from its config dataclass, and a
config written back as flags (what the pipeline launches) parses to the same config."""

import argparse
import dataclasses

import pytest

from megatron_miniplm import settings
from megatron_miniplm.data.config import PreprocessConfig
from megatron_miniplm.data.config import SplitConfig
from megatron_miniplm.models.config import ModelConfig
from presets import get_preset
from megatron_miniplm.scoring.config import ScoreConfig
from megatron_miniplm.selection.config import SelectionConfig
from megatron_miniplm.selection.sample import SampleRequest
from megatron_miniplm.training.config import DDPSettings, OptimizerSettings
from megatron_miniplm.training.config import TrainConfig


def _parser(cls):
    p = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(p, cls)
    return p


CONFIGS = [
    TrainConfig(model=get_preset("tiny"), data_path=["a", "0.5 b"], train_tokens=10_000, data_order="original",
                bf16=True, seed=7, optimizer=OptimizerSettings(lr=1e-3, min_lr=0.0, clip_grad=0.0),
                ddp=DDPSettings(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True),
                no_load_optim=True, exit_duration_in_mins=1.5, lr_warmup_fraction=0.1),
    ScoreConfig(data_path="d", load="c", output_prefix="o", bf16=True, verify_fingerprint=False, progress=False,
                max_tokens_per_batch=4096),
    SampleRequest(data_paths=["d0", "d1"], output="o", teacher_scores=["t0", "t1"], report_dir="r",
                  config=SelectionConfig(method="uniform", keep_tokens=99, order="shuffled", seed=3)),
    PreprocessConfig(inputs=["x.jsonl", "y*.jsonl.zst"], output_prefix="o", tokenizer="t", workers=3,
                     on_error="skip", progress=False, eod_token="</s>"),
    SplitConfig("in", "ref", "rest", ref_tokens=1000, seed=9),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_flags_give_the_config_back(config):
    argv = settings.to_argv(config, only_changed=False)
    given = {"model": config.model} if isinstance(config, TrainConfig) else {}
    again = settings.from_args(type(config), _parser(type(config)).parse_args(argv), **given)
    assert again == config
    short = settings.to_argv(config)  # defaults left out: the same config
    assert settings.from_args(type(config), _parser(type(config)).parse_args(short), **given) == config
    assert len(short) <= len(argv)


def test_every_flag_has_help_and_none_is_declared_twice():
    for cls in (TrainConfig, ScoreConfig, SampleRequest, PreprocessConfig, SplitConfig, ModelConfig):
        flags = [settings.flag_of(f) for f, _ in settings.cli_fields(cls)]
        assert len(flags) == len(set(flags)), cls
        assert all(f.metadata["help"] for f, _ in settings.cli_fields(cls))


def _flags(cls):
    return {settings.flag_of(f) for f, _ in settings.cli_fields(cls)}


def test_megatron_lm_names_and_one_name_per_concept():
    train = _flags(TrainConfig) | _flags(ModelConfig)
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--micro-batch-size",
                 "--global-batch-size", "--seq-length", "--train-iters", "--lr-warmup-iters", "--lr-warmup-fraction",
                 "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather", "--no-load-optim",
                 "--exit-signal-handler", "--exit-duration-in-mins", "--exit-interval", "--data-cache-path",
                 "--dist-ckpt-optim-fully-reshardable", "--untie-embeddings-and-output-weights",
                 "--num-query-groups", "--make-vocab-size-divisible-by", "--data-path", "--bf16"):
        assert flag in train, flag
    assert "--data-order" in train and "--data-order" in _flags(SampleRequest)  # not --order
    for cls in (ScoreConfig, SampleRequest, PreprocessConfig):
        assert "--output-prefix" in _flags(cls) and "--output" not in _flags(cls)
    assert "--data-path" in _flags(ScoreConfig) and "--data-path" in _flags(SampleRequest)


def test_model_flags_override_a_preset():
    p = argparse.ArgumentParser()
    settings.add_arguments(p, ModelConfig, overrides=True)
    ns = p.parse_args(["--num-layers", "3", "--untie-embeddings-and-output-weights"])
    assert settings.given(ns, ModelConfig) == {"num_layers": 3, "tie_embeddings": False}
    assert settings.given(p.parse_args([]), ModelConfig) == {}


def test_from_mapping_refuses_unknown_keys():
    with pytest.raises(ValueError, match="here.colour: not a setting of SplitConfig \\(known: input_prefix,"):
        settings.from_mapping(SplitConfig, {"input_prefix": "a", "colour": 1}, where="here")
    assert dataclasses.asdict(settings.from_mapping(SelectionConfig, {"alpha": 0.5}))["alpha"] == 0.5
