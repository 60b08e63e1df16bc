"""Student sizes and the data-limited setting, through the whole pipeline on the tiny setting:
every method (SeqKD's student included) trained at three sizes, the evaluation's fitted
curves, savings and extrapolation (and its plot); the 'all' baseline trains on the whole corpus D repeated to
the students' tokens, MiniPLM on its selection repeated to the same tokens.

Slow (4.5 to 12.5 min on a shared 2-core machine: six student trainings besides the pipeline's stages);
`bash examples/pretrain_miniplm.sh examples/configs/demo_sweep.yaml` and
`.../data_limited.yaml` run the same paths on the demo, and tests/evaluation/test_scaling.py,
tests/pipeline/test_pipeline_config.py (labels, models, the 'all' stage's data and budget)
and test_example_configs.py (dry runs) are in the default run."""

import json
import os

import pytest

from pipeline_helpers import TINY_MODEL, run_pipeline, tiny_config, write_config

SIZES = [{**TINY_MODEL, "hidden_size": h, "ffn_hidden_size": 2 * h} for h in (16, 32, 64)]
LABELS = ["L2-H16", "L2-H32", "L2-H64"]
pytestmark = pytest.mark.slow


def _record(work_dir, stage):
    with open(os.path.join(work_dir, "records", f"{stage}.json")) as f:
        return json.load(f)["output"]


@pytest.fixture(scope="module")
def sweep(setting, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = tiny_config(setting, root / "work", vanilla_kd={"enabled": False},
                       selection={"alpha": 0.5, "baselines": ["all"]},
                       seqkd={"enabled": True, "prompt_length": 8, "micro_batch_size": 16})
    # 3 passes over MiniPLM's selection (half of D): 1.5 passes over D, more tokens than D holds
    # validations every 8 steps: the within-run curves the saving is read from
    data["student"] = {**data["student"], "sizes": SIZES, "epochs": 3,
                       "train": {**data["student"]["train"], "eval_interval": 8}}
    out = run_pipeline(write_config(root / "sweep.yaml", data))
    assert out.returncode == 0, out.stdout[-4000:]
    return root / "work", out.stdout


def test_every_method_is_trained_at_every_size_and_fitted(sweep):
    work, output = sweep
    results = json.load(open(os.path.join(_record(work, "evaluate"), "results.json")))
    students = {f"student-{m}@{s}" for m in ("miniplm", "all", "seqkd") for s in LABELS}
    assert students <= set(results["models"])
    scaling = results["scaling"]
    assert scaling["refused"] is None and scaling["baseline"] == "student-all"
    assert set(scaling["fits"]) == {"student-miniplm", "student-all", "student-seqkd"}
    # one generated corpus, whose teacher FLOPs every SeqKD student's row carries
    gen = {results["models"][f"student-seqkd@{s}"]["generation_flops"] for s in LABELS}
    assert len(gen) == 1 and gen.pop() > 0
    flops = [results["models"][f"student-miniplm@{s}"]["train_flops"] for s in LABELS]
    assert flops == sorted(flops) and flops[0] < flops[-1]  # larger students, more compute
    for e in scaling["extrapolation"].values():  # by default to 10x the sweep's largest compute
        assert e["low"] <= e["loss"] <= e["high"] and e["flops"] == pytest.approx(10 * flops[-1], rel=1e-6)
    assert set(scaling["saving"]) == {"student-miniplm", "student-seqkd"}
    assert set(scaling["within_run"]["student-miniplm"]) == set(LABELS)
    methods = {"student-miniplm", "student-all", "student-seqkd"}
    assert {p["method"] for p in scaling["points"]} == methods  # not the reference
    assert "fitted per method, loss against training FLOPs: L(C) = l_inf + a * (C / c0) ** -alpha" in output
    assert "computation saving of student-miniplm at L2-H32 from the sweep's fit of student-all" in output
    assert open(scaling["plot"], "rb").read(4) == b"\x89PNG"


def _tokens(prefix, key="num_tokens"):
    return json.load(open(prefix + ".meta.json"))[key]


def _train_state(stage_dir):
    """A student's checkpointed training state (consumed samples, counted tokens, FLOPs)."""
    from megatron.core import dist_checkpointing

    from megatron_miniplm.dist_checkpoint import resolve_checkpoint_dir

    return dist_checkpointing.load_common_state_dict(resolve_checkpoint_dir(os.path.join(stage_dir, "ckpt")))[
        "train_state"]


def test_the_data_limited_baseline_repeats_all_of_the_corpus_at_equal_tokens(sweep):
    work, _ = sweep
    select, split = _record(work, "select"), _record(work, "split")
    corpus, selected = _tokens(os.path.join(split, "rest")), _tokens(os.path.join(select, "miniplm"), "tokens_kept")
    instances = {"all": _tokens(os.path.join(split, "rest"), "num_instances"),
                 "miniplm": _tokens(os.path.join(select, "miniplm"), "num_selected")}
    for size in LABELS:
        states = {m: _train_state(_record(work, f"student-{m}@{size}")) for m in ("miniplm", "all")}
        # equal tokens: the same number of seq_length-token sequences for both students (the
        # tokens that count, padding left out, differ by the two datasets' instance lengths)
        slots = {m: st["consumed_samples"] * 32 for m, st in states.items()}
        assert slots["all"] == slots["miniplm"]
        assert states["all"]["consumed_tokens"] == pytest.approx(states["miniplm"]["consumed_tokens"], rel=0.1)
        # the budget, in tokens, is what the config says: 3 passes over the selection, 1.5 over
        # all of D, more tokens than D holds
        assert slots["all"] / selected == pytest.approx(3, rel=0.05)
        assert slots["all"] / corpus == pytest.approx(1.5, rel=0.1) and slots["all"] > corpus
        # each dataset is reshuffled every epoch: every instance of D is seen and D repeated,
        # the selection more than twice (padding makes the passes over instances fewer than over tokens)
        passes = {m: states[m]["consumed_samples"] / instances[m] for m in states}
        assert passes["all"] > 1 and passes["miniplm"] > 2
