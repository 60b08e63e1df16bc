"""The pipeline config: one declaration per setting, sources in order, refusals that name the setting."""

import os

import pytest
import yaml

from megatron_miniplm.pipeline import config
from megatron_miniplm.pipeline.config import ConfigError, PipelineConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_demo_config_file_is_the_defaults():
    cfg, _ = config.load(os.path.join(REPO, "examples", "configs", "demo.yaml"), environ={})
    assert cfg == PipelineConfig()


def test_every_example_config_loads():
    for name in os.listdir(os.path.join(REPO, "examples", "configs")):
        config.load(os.path.join(REPO, "examples", "configs", name), environ={})


def test_sources_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"selection": {"alpha": 0.4}, "seed": 7}))
    cfg, sources = config.load(str(path), ["selection.alpha=0.2"], environ={"ALPHA": "0.3", "SEED": "9"})
    assert cfg.selection["alpha"] == 0.2 and sources["selection.alpha"] == "command line"
    assert cfg.seed == 9 and sources["seed"] == "$SEED"
    assert "baselines" not in cfg.selection  # the file's section replaces the demo's whole
    cfg, _ = config.load(None, ["selection.alpha=0.2"], environ={})
    assert cfg.selection == {"alpha": 0.2, "baselines": ["uniform"]}  # a single key merges into it


def test_a_later_setting_drops_what_it_is_an_alternative_to(tmp_path):
    """ref_tokens replaces ref_fraction, lr_warmup_iters lr_warmup_fraction, keep_tokens alpha;
    a model preset replaces the model settings of earlier sources."""
    cfg, _ = config.load(None, ["split.ref_tokens=5000", "student.train.lr_warmup_iters=10",
                                "selection.keep_tokens=900", "reference.model.preset=qwen-104M"], environ={})
    assert cfg.split == {"ref_tokens": 5000}
    assert cfg.student.train["lr_warmup_iters"] == 10 and "lr_warmup_fraction" not in cfg.student.train
    assert cfg.selection == {"keep_tokens": 900, "baselines": ["uniform"]}
    assert cfg.reference.model == {"preset": "qwen-104M"}
    cfg, _ = config.load(None, ["reference.model.preset=qwen-104M", "reference.model.num_layers=4"], environ={})
    assert cfg.reference.model == {"preset": "qwen-104M", "num_layers": 4}  # a preset, then changes to it


def test_the_launchers_environment_variables_still_work():
    env = {"REF_MODEL": "--model-preset qwen-104M", "STUDENT_MODEL": "--num-layers 3 --hidden-size 64 "
           "--ffn-hidden-size 128 --num-attention-heads 4 --untie-embeddings-and-output-weights",
           "BF16": "", "MBS": "2", "GBS": "8", "CORPUS_TRAIN": "a.jsonl 'b c.jsonl'", "NNODES": "2",
           "WORK_DIR": "/x"}
    cfg, _ = config.load(None, environ=env)
    assert cfg.reference.model == {"preset": "qwen-104M"}
    assert cfg.student.model == {"num_layers": 3, "hidden_size": 64, "ffn_hidden_size": 128,
                                 "num_attention_heads": 4, "tie_embeddings": False}
    assert cfg.bf16 is False
    assert cfg.reference.train["micro_batch_size"] == cfg.student.train["micro_batch_size"] == 2
    assert cfg.corpus.train == ["a.jsonl", "b c.jsonl"] and cfg.parallel.nnodes == 2 and cfg.work_dir == "/x"


@pytest.mark.parametrize("override,message", [
    ("selection.beta=1", "selection.beta: not a setting of SelectionConfig"),
    ("student.train.seed=3", "student.train.seed: set seed once, at the top"),
    ("scoring.seq_length=64", "scoring.seq_length: set seq_length once, at the top"),
    ("reference.train.data_path=[x]", "reference.train.data_path: set by the pipeline itself"),
    ("colour=red", "unknown setting(s) colour"),
    ("student.model.depth=3", "student.model: unknown model setting(s) depth"),
    ("vanilla_kd.kd_teacher_load=x", "vanilla_kd: unknown setting(s) kd_teacher_load; known: enabled, kd_ratio, "
                                     "kd_temperature"),
    ("evaluation.beta=x", "evaluation.beta: not a setting of EvalConfig"),
    ("evaluation.bootstrap_seed=3", "evaluation.bootstrap_seed: set by the pipeline itself"),
    ("evaluation.bf16=true", "evaluation.bf16: set bf16 once, at the top"),
    ("alpha", "expected key=value"),
])
def test_refusals_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        config.load(None, [override], environ={})


def test_yaml_aliases_do_not_tie_sections_together(tmp_path):
    """A file may give two sections one mapping through a YAML alias; a later key changes one."""
    path = tmp_path / "c.yaml"
    model = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2}
    path.write_text(yaml.safe_dump({"reference": {"model": model}, "student": {"model": model}}))
    assert "&id" in path.read_text()  # one mapping, written once
    cfg, _ = config.load(str(path), ["student.model.num_layers=6"], environ={})
    assert cfg.reference.model["num_layers"] == 2 and cfg.student.model["num_layers"] == 6
