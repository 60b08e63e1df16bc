"""The model card (README.md) that tools/convert_checkpoint.py writes beside an exported student.

A tiny student is trained for a few steps on a sampled blend of tools/difference_sample.py
(score files made by hand, with the model identities the scorer records), in a pipeline
work directory's layout (WORK_DIR/STAGE/FINGERPRINT/ckpt), and exported:

- the card's metadata header is YAML with the Hub's keys; its shape and parameter count
  are the model's, its tokens seen and FLOPs the checkpoint's train state;
- the blend's selection (method, alpha, seed), teacher and reference (name, checkpoint,
  source, score files' sha256) appear;
- with tools/evaluate.py's results (given, or found through the pipeline's evaluation
  record), the card's held-out LM loss is the results' value for this checkpoint; results
  that did not score it are refused, and nothing is written;
- a student trained with Vanilla KD names its teacher, ratio and temperature.
"""

import importlib
import json
import os
import re

import numpy as np
import pytest
import yaml

from distributed import run_distributed
from presets import model_flags
from selection_helpers import EOD, VOCAB, build_dataset, make_tokenizer

TOOL = importlib.import_module("megatron_miniplm.cli.convert_checkpoint")
SEQ = 48  # the corpus's instances hold up to 48 tokens
ALPHA = 0.5


def convert(*args) -> int:
    return TOOL.main([str(a) for a in args])


def _train(argv):
    from megatron_miniplm.cli import pretrain_gpt

    assert pretrain_gpt.main(argv) == 0


def train_flags(data, save, *extra, iters=3):
    return [*model_flags("tiny"), "--data-path", data, "--seq-length", str(SEQ), "--micro-batch-size", "4",
            "--global-batch-size", "8", "--train-iters", str(iters), "--num-workers", "0", "--save", save,
            "--seed", "5", *extra]


def identity(role: str) -> dict:
    """A scoring model as tools/score_docs.py records it: checkpoint, config, checkpoint_info."""
    return {"checkpoint": f"/models/{role}/ckpt/iter_0000100",
            "config": {"name": f"{role}-tiny", "num_layers": 2, "hidden_size": 64},
            "checkpoint_info": {"source": f"/hub/models--org--{role}-1B/snapshots/abc", "source_format": "hf",
                                "architecture": "Qwen2ForCausalLM"}}


def make_blend(root: str) -> str:
    from megatron_miniplm.scoring.score_file import save_scores
    from megatron_miniplm.selection.config import SelectionConfig
    from megatron_miniplm.selection.sample import SampleRequest, run

    rng = np.random.default_rng(0)
    lengths = rng.integers(8, SEQ + 1, 120)
    sequences = [np.append(rng.integers(0, VOCAB, n - 1), EOD).astype(np.int64) for n in lengths]
    meta = build_dataset(os.path.join(root, "corpus"), sequences, rng.integers(0, 3, 120), make_tokenizer(root))
    count = (lengths - 1).astype(np.float64)
    for role, mean in (("teacher", 2.0), ("reference", 3.0)):
        nll = np.stack([(mean + rng.random(120)) * count, count], axis=1)
        save_scores(os.path.join(root, role), nll,
                    {"dataset_fingerprint": meta["fingerprint"], "model": identity(role)})
    blend = os.path.join(root, "blend")
    run(SampleRequest(data_paths=[os.path.join(root, "corpus")], output=blend, config=SelectionConfig(alpha=ALPHA),
                      teacher_scores=[os.path.join(root, "teacher")],
                      reference_scores=[os.path.join(root, "reference")]))
    return blend


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """(work dir, blend prefix, the student's --save directory in a pipeline stage's layout)."""
    work = tmp_path_factory.mktemp("work")
    data = work / "data"
    data.mkdir()
    blend = make_blend(str(data))
    save = work / "student-miniplm" / "0123456789abcdef" / "ckpt"
    run_distributed(_train, 1, train_flags(blend, str(save)))
    return work, blend, str(save)


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    """The student exported with no evaluation anywhere: (card text, export directory)."""
    out = tmp_path_factory.mktemp("export") / "hf"
    assert convert("--direction", "megatron-to-hf", "--load", student[2], "--save", out) == 0
    return (out / "README.md").read_text(), out


def header(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


def table_value(card: str, label: str) -> str:
    match = re.search(rf"^\| {re.escape(label)} \| (.*?) \|$", card, re.M)
    assert match, f"no row {label!r} in the card"
    return match.group(1)


def train_state(save: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_miniplm.dist_checkpoint import resolve_checkpoint_dir

    return dist_checkpointing.load_common_state_dict(resolve_checkpoint_dir(save))["train_state"]


def test_card_header_shape_parameters_and_tokens(student, exported):
    from transformers import AutoModelForCausalLM

    from megatron_miniplm.dist_checkpoint import load_model_config, resolve_checkpoint_dir
    from megatron_miniplm.models.param_count import count_parameters

    card, out = exported
    meta = header(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"miniplm", "knowledge-distillation", "megatron-core"} <= set(meta["tags"])
    assert "license" in meta and meta["license"] is None  # left for the publisher
    assert "base_model" not in meta and "datasets" not in meta  # trained from scratch on local files
    config = load_model_config(resolve_checkpoint_dir(student[2]))
    for label, want in (("Layers", config.num_layers), ("Hidden size", config.hidden_size),
                        ("FFN hidden size", config.ffn_hidden_size), ("Attention heads", config.num_attention_heads),
                        ("Key/value heads", config.kv_heads)):
        assert int(table_value(card, label)) == want, label
    params = int(table_value(card, "Parameters").split()[0].replace(",", ""))
    assert params == count_parameters(config).total == AutoModelForCausalLM.from_pretrained(out).num_parameters()
    state = train_state(student[2])
    seen = re.search(r"^- Tokens seen: ([\d,]+)", card, re.M).group(1)
    assert int(seen.replace(",", "")) == state["consumed_tokens"] > 0
    assert re.search(r"^- Iterations: (\d+)", card, re.M).group(1) == str(state["iteration"]) == "3"
    assert f"Training FLOPs: {state['consumed_flops']:.3e}" in card
    info = json.load(open(os.path.join(resolve_checkpoint_dir(student[2]), "checkpoint_info.json")))
    assert f"`{info['tokenizer']['sha256']}`" in card and "Vocabulary size: 102" in card
    assert "No held-out evaluation of this checkpoint was found" in card
    assert "Vanilla knowledge distillation" not in card


def test_card_names_the_blends_selection_teacher_and_reference(student, exported):
    card, _ = exported
    blend = json.load(open(student[1] + ".meta.json"))
    assert f"`{student[1]}`: a sampled blend of tools/difference_sample.py" in card
    assert f"Method: **{blend['method']}**, alpha = {ALPHA}" in card and blend["method"] == "difference"
    assert f"seed {blend['seed']}" in card
    assert f"Kept: {blend['num_selected']:,} of {blend['num_instances_total']:,} instances" in card
    for role in ("teacher", "reference"):
        model = identity(role)
        line = re.search(rf"^- {role.capitalize()}: (.*)$", card, re.M).group(1)
        assert f"**{role}-tiny**" in line and model["checkpoint"] in line
        assert model["checkpoint_info"]["source"] in line and "Qwen2ForCausalLM" in line
        entry = blend["scores"][role][0]
        assert f"| `{entry['prefix']}` | `{entry['sha256']}` | `{entry['dataset_fingerprint']}` |" in card
    assert blend["datasets"][0]["fingerprint"] in card


def results_file(path, checkpoint: str, loss: float) -> str:
    """A results.json as tools/evaluate.py writes it: this checkpoint a seed of "miniplm"."""
    def run(ckpt, lm_loss):
        return {"checkpoint": ckpt, "lm_loss": lm_loss, "token_weighted_loss": lm_loss + 0.01,
                "perplexity": float(np.exp(lm_loss + 0.01)), "instances": 40, "tokens": 1200}

    results = {
        "models": {
            "reference": {"lm_loss": 4.5, "seeds": 1, "lm_loss_std": None, "runs": [run("/elsewhere/ckpt", 4.5)],
                          "domains": {"web": {"lm_loss": 4.4, "lm_loss_std": None, "instances": 40}}},
            "miniplm": {"lm_loss": (loss + 4.0) / 2, "seeds": 2, "lm_loss_std": 0.5,
                        "runs": [run(checkpoint, loss), run("/other/seed/ckpt", 4.0)],
                        "domains": {"web": {"lm_loss": 3.9, "lm_loss_std": 0.1, "instances": 40}}},
        },
        "baseline_of_comparison": "reference",
        "comparisons": {"miniplm": {"overall": {"mean": 0.75, "low": 0.5, "high": 1.0, "level": 0.95,
                                                "instances": 40}}},
        "config": {"data_path": "/data/test"},
    }
    with open(path, "w") as f:
        json.dump(results, f)
    return str(path)


def held_out_loss(card: str) -> float:
    return float(table_value(card, "LM loss (mean of per-instance losses)"))


def test_card_shows_the_results_row_of_this_checkpoint(student, tmp_path):
    results = results_file(tmp_path / "results.json", student[2], 3.14159)
    out = tmp_path / "hf"
    # the run recorded --save; the export names the iteration: the same checkpoint once resolved
    load = os.path.join(student[2], "iter_0000003")
    assert convert("--direction", "megatron-to-hf", "--load", load, "--save", out, "--results", results) == 0
    card = (out / "README.md").read_text()
    assert held_out_loss(card) == pytest.approx(3.14159, abs=5e-5)
    assert "model **miniplm**" in card and "test set `/data/test`" in card
    assert table_value(card, "LM loss over the model's 2 seeds") == f"{(3.14159 + 4.0) / 2:.4f} ± 0.5000"
    assert "| web | 3.9000 | 40 |" in card  # the model's domains, not the reference's
    assert "reference minus miniplm: +0.7500 (95% interval [+0.5000, +1.0000])" in card


def test_card_finds_the_pipelines_evaluation(student, tmp_path):
    work = student[0]
    evaluation = work / "evaluate" / "fedcba9876543210"
    evaluation.mkdir(parents=True, exist_ok=True)
    results_file(evaluation / "results.json", student[2], 2.71828)
    (work / "records").mkdir(exist_ok=True)
    (work / "records" / "evaluate.json").write_text(json.dumps({"stage": "evaluate", "output": str(evaluation)}))
    try:
        assert convert("--direction", "megatron-to-hf", "--load", student[2], "--save", tmp_path / "hf") == 0
    finally:
        os.remove(work / "records" / "evaluate.json")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert held_out_loss(card) == pytest.approx(2.71828, abs=5e-5)
    assert str(evaluation / "results.json") in card


def test_results_that_did_not_score_the_checkpoint_are_refused(student, tmp_path, capsys):
    results = results_file(tmp_path / "results.json", "/not/this/ckpt", 3.0)
    assert convert("--direction", "megatron-to-hf", "--load", student[2], "--save", tmp_path / "hf",
                   "--results", results) == 1
    err = capsys.readouterr().err
    assert results in err and "no model's runs scored the checkpoint" in err
    (tmp_path / "bad.json").write_text("{not json")
    assert convert("--direction", "megatron-to-hf", "--load", student[2], "--save", tmp_path / "hf",
                   "--results", tmp_path / "bad.json") == 1
    assert f"{tmp_path / 'bad.json'}: results file of tools/evaluate.py is not valid JSON" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "results.json"]  # no export, no temporary directory
    with pytest.raises(SystemExit):
        convert("--direction", "megatron-to-hf", "--load", student[2], "--save", tmp_path / "hf",
                "--results", results, "--no-model-card")


def test_hub_ids_only_from_the_hub_cache_layout():
    from megatron_miniplm.evaluation.model_card import base_model_of, hub_id

    assert hub_id("/cache/hub/models--Qwen--Qwen1.5-1.8B/snapshots/0a1b") == "Qwen/Qwen1.5-1.8B"
    assert hub_id("/cache/hub/models--gpt2/snapshots/0a1b") == "gpt2"
    assert hub_id("/cache/datasets--org--corpus/snapshots/1/a.parquet", "dataset") == "org/corpus"
    assert hub_id("/models/Qwen1.5-1.8B") is None and hub_id(None) is None
    imported = {"source": "/cache/hub/models--org--teacher-1B/snapshots/abc", "source_format": "hf"}
    assert base_model_of(imported, None) == "org/teacher-1B"
    assert base_model_of({"source": "tools/pretrain_gpt.py", "source_format": "megatron"}, {"load": None}) is None


def test_training_data_of_a_weighted_blend(student, tmp_path):
    """A Megatron-style weighted --data-path: each prefix with its share; one that is gone is unknown."""
    from megatron_miniplm.evaluation.model_card import CardFacts, data_section, read_data_sources

    corpus = os.path.join(os.path.dirname(student[1]), "corpus")
    gone = str(tmp_path / "gone")
    run_config = {"data_path": ["3", corpus, "1", gone]}
    sources = read_data_sources(run_config, "run_config.json")
    assert [(s.kind, s.weight) for s in sources] == [("dataset", 0.75), (None, 0.25)]
    text = data_section(CardFacts(checkpoint="", config=None, params=None, info=None, run_config=run_config,
                                  train_state=None, data=sources))
    meta = json.load(open(corpus + ".meta.json"))
    assert f"- `{corpus}` (weight 0.75 of the blend): a dataset of 120 instances" in text
    assert f"(fingerprint `{meta['fingerprint']}`)" in text
    assert f"- `{gone}` (weight 0.25 of the blend): its meta file is not found here" in text
    with pytest.raises(ValueError, match="run_config.json: data_path"):
        read_data_sources({"data_path": ["a", "b", "c"]}, "run_config.json")


def test_no_model_card(student, tmp_path):
    out = tmp_path / "hf"
    assert convert("--direction", "megatron-to-hf", "--load", student[2], "--save", out, "--no-model-card") == 0
    assert not (out / "README.md").exists() and (out / "model.safetensors").exists()


def test_card_of_a_vanilla_kd_student(student, tmp_path):
    """Distilled online from the first student (same tokenizer): the card names the KD teacher."""
    from megatron_miniplm.dist_checkpoint import resolve_checkpoint_dir

    save = str(tmp_path / "kd")
    run_distributed(_train, 1, train_flags(student[1], save, "--kd-teacher-load", student[2], "--kd-ratio", "0.7",
                                           "--kd-temperature", "2.0", iters=2))
    assert convert("--direction", "megatron-to-hf", "--load", save, "--save", tmp_path / "hf") == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    section = card[card.index("### Vanilla knowledge distillation"):]
    teacher = os.path.realpath(resolve_checkpoint_dir(student[2]))
    assert f"checkpoint `{teacher}`" in section and f"Loaded from: `{student[2]}`" in section
    assert "KD ratio r: 0.7" in section and "Temperature T: 2.0" in section
    assert "the KD teacher's forward passes included" in card


def test_card_states_the_comparison_the_evaluation_made_and_what_its_interval_covers():
    """From results as tools/evaluate.py summarizes them: in a size sweep a model is compared with
    the first method at its own size, and the card names that model; an interval of a model with
    one training seed covers the test set only, and the card says so as the verdict does."""
    from megatron_miniplm.evaluation.model_card import Evaluation, comparison_text
    from megatron_miniplm.evaluation.report import summarize

    rng = np.random.default_rng(1)
    count = rng.integers(5, 30, 80).astype(np.float64)
    loss = rng.gamma(4.0, 1.0, 80)
    scores = lambda shift: np.stack([(loss + shift + rng.normal(0, 0.01, 80)) * count, count], axis=1)
    runs = {"a@s": [("c1", scores(0.0))], "b@s": [("c2", scores(0.1))],
            "a@l": [("c3", scores(-0.5)), ("c4", scores(-0.5))], "b@l": [("c5", scores(-0.2)), ("c6", scores(-0.2))]}
    results = summarize(runs, None, [], bootstrap_samples=200, seed=0)
    large = comparison_text(Evaluation(results=results, model="b@l"))
    d = results["comparisons"]["b@l"]["overall"]
    assert f"a@l minus b@l: {d['mean']:+.4f} (95% interval [{d['low']:+.4f}, {d['high']:+.4f}])" in large
    assert d["mean"] == pytest.approx(-0.3, abs=0.01)
    assert "covers test instances and training seeds" in large and "seed noise" not in large
    small = comparison_text(Evaluation(results=results, model="b@s"))
    assert "a@s minus b@s: -0.1" in small
    assert "covers test instances only: with one training seed it cannot tell a method effect from seed noise" in small


def test_card_usage_loads_the_tokenizer_the_model_was_trained_with(exported):
    """The card's usage code, run on the export (a qwen2 layout with a tokenizer of no model
    family), tokenizes as the shipped tokenizer.json does: AutoTokenizer would rebuild a
    Qwen2Tokenizer from its vocabulary and split the text otherwise."""
    from tokenizers import Tokenizer

    card, out = exported
    assert json.load(open(out / "config.json"))["model_type"] == "qwen2"
    code = re.search(r"## Usage\n\n```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(code.replace("PATH/TO/THIS/DIRECTORY", str(out)), scope)
    text = "w3 w17 w5 <|endoftext|>"
    want = Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids
    assert want == [3, 17, 5, EOD]
    assert scope["tokenizer"](text)["input_ids"] == want
    assert scope["tokenizer"].eos_token == "<|endoftext|>"
