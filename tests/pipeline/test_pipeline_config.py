"""The pipeline config: one declaration per setting, sources in order, refusals that name the setting."""

import dataclasses
import os
import re

import pytest
import yaml

from megatron_miniplm.pipeline import config
from megatron_miniplm.pipeline.config import ConfigError, PipelineConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_demo_config_file_is_the_defaults():
    cfg, _ = config.load(os.path.join(REPO, "examples", "configs", "demo.yaml"), environ={})
    assert cfg == PipelineConfig()


def test_every_example_config_loads_as_written():
    """Each shipped file's keys are the config's values (its dry run is tests/pipeline/test_example_configs.py)."""
    for name in os.listdir(os.path.join(REPO, "examples", "configs")):
        path = os.path.join(REPO, "examples", "configs", name)
        cfg, sources = config.load(path, environ={})
        written = yaml.safe_load(open(path)) or {}
        for key in sources:
            value, node = cfg, written
            for part in key.split("."):
                value, node = getattr(value, part) if not isinstance(value, dict) else value[part], node[part]
            if dataclasses.is_dataclass(value):  # an empty section: its defaults
                value, node = dataclasses.asdict(value), dataclasses.asdict(type(value)(**node))
            assert value == node, (name, key)


def test_sources_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"selection": {"alpha": 0.4}, "seed": 7}))
    cfg, sources = config.load(str(path), ["selection.alpha=0.2"], environ={"ALPHA": "0.3", "SEED": "9"})
    assert cfg.selection.alpha == 0.2 and sources["selection.alpha"] == "command line"
    assert cfg.seed == 9 and sources["seed"] == "$SEED"
    assert cfg.selection.baselines == []  # the file's section replaces the demo's whole
    cfg, _ = config.load(None, ["selection.alpha=0.2"], environ={})
    assert (cfg.selection.alpha, cfg.selection.baselines) == (0.2, ["uniform"])  # a single key merges into it


def test_a_later_setting_drops_what_it_is_an_alternative_to(tmp_path):
    """ref_tokens replaces ref_fraction, lr_warmup_iters lr_warmup_fraction, keep_tokens alpha;
    a model preset replaces the model settings of earlier sources."""
    cfg, _ = config.load(None, ["split.ref_tokens=5000", "student.train.lr_warmup_iters=10",
                                "selection.keep_tokens=900", "reference.model.preset=qwen-104M"], environ={})
    assert (cfg.split.ref_tokens, cfg.split.ref_fraction) == (5000, None)
    assert (cfg.student.train.lr_warmup_iters, cfg.student.train.lr_warmup_fraction) == (10, None)
    assert (cfg.selection.keep_tokens, cfg.selection.alpha, cfg.selection.baselines) == (900, None, ["uniform"])
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
    assert cfg.reference.train.micro_batch_size == cfg.student.train.micro_batch_size == 2
    assert cfg.corpus.train == ["a.jsonl", "b c.jsonl"] and cfg.parallel.nnodes == 2 and cfg.work_dir == "/x"


@pytest.mark.parametrize("override,message", [
    ("selection.beta=1", "selection.beta: not a setting of SelectionConfig"),
    ("student.train.seed=3", "student.train.seed: set seed once, at the top"),
    ("scoring.seq_length=64", "scoring.seq_length: set seq_length once, at the top"),
    ("reference.train.data_path=[x]", "reference.train.data_path: set by the pipeline itself"),
    ("student.train.train_iters=9", "student.train.train_iters: set by the pipeline itself; give student.train_iters"),
    ("vanilla_kd.match=tokens", "vanilla_kd.match: 'tokens' is not one of flops, steps"),
    ("colour=red", "colour: not a setting of PipelineConfig (known: work_dir,"),
    ("seq_lenght=3", "seq_lenght: not a setting of PipelineConfig; did you mean seq_length?"),
    ("parallel.nnode=2", "parallel.nnode: not a setting of Parallel; did you mean nnodes?"),
    ("selection.alpah=0.3", "selection.alpah: not a setting of SelectionConfig; did you mean alpha?"),
    ("student.train.lr_warmup_fractoin=0.1", "student.train.lr_warmup_fractoin: not a setting of TrainConfig; "
                                             "did you mean lr_warmup_fraction?"),
    ("student.model.depth=3", "student.model.depth: not a setting of ModelConfig"),
    ("student.model.num_layer=3", "student.model.num_layer: not a setting of ModelConfig; did you mean num_layers?"),
    ("vanilla_kd.kd_teacher_load=x", "vanilla_kd.kd_teacher_load: set by the pipeline itself"),
    ("vanilla_kd.kd_ratios=x", "vanilla_kd.kd_ratios: not a setting of KDSettings; did you mean kd_ratio? "
                               "(known: enabled, kd_ratio, "
                               "kd_temperature"),
    ("student.train.lr=fast", "student.train.lr: expected a number, got 'fast'"),
    ("scoring.micro_batch_size=1.5", "scoring.micro_batch_size: expected an integer, got 1.5"),
    ("selection.baselines=uniform", "selection.baselines: expected a list, got 'uniform'"),
    ("reference.train.data_order=sorted", "reference.train.data_order: 'sorted' is not one of shuffled, original"),
    ("reference.model.num_layers=two", "reference.model.num_layers: expected an integer, got 'two'"),
    ("vanilla_kd.enabled=1", "vanilla_kd.enabled: expected true or false, got 1"),
    ("parallel.nnodes=x", "parallel.nnodes: expected an integer, got 'x'"),
    ("evaluation.beta=x", "evaluation.beta: not a setting of EvalConfig"),
    ("evaluation.bootstrap_seed=3", "evaluation.bootstrap_seed: set by the pipeline itself"),
    ("evaluation.bf16=true", "evaluation.bf16: set bf16 once, at the top"),
    ("alpha", "expected key=value"),
    ("wandb.mode=on", "wandb.mode: True is not one of online, offline (YAML reads on, off, yes and no as true or "
                      "false: quote the value)"),
    ("selection..alpha=0.3", "'selection..alpha=0.3': expected key=value"),
    ("selection.=0.3", "'selection.=0.3': expected key=value"),
    ("reference.sizes=[qwen-104M]", "reference.sizes: only the students"),
    ("student.sizes=[{num_layers: two}]", "student.sizes[0].num_layers: expected an integer, got 'two'"),
    ("student.sizes=[{depth: 2}]", "student.sizes[0].depth: not a setting of ModelConfig"),
])
def test_refusals_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("?", r"\?")):
        config.load(None, [override], environ={})


def test_yaml_aliases_do_not_tie_sections_together(tmp_path):
    """A file may give two sections one mapping through a YAML alias; a later key changes one."""
    path = tmp_path / "c.yaml"
    model = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2}
    path.write_text(yaml.safe_dump({"reference": {"model": model}, "student": {"model": model}}))
    assert "&id" in path.read_text()  # one mapping, written once
    cfg, _ = config.load(str(path), ["student.model.num_layers=6"], environ={})
    assert cfg.reference.model["num_layers"] == 2 and cfg.student.model["num_layers"] == 6


def test_config_modules_import_no_torch():
    """--dry-run and --help stay instant: the pipeline config, every stage's config and the
    stage graph build without torch, megatron, numpy or transformers."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from megatron_miniplm.pipeline import config, invariants, stages\n"
            "import megatron_miniplm.data.config, megatron_miniplm.scoring.config, megatron_miniplm.selection.config\n"
            "import megatron_miniplm.training.config, megatron_miniplm.evaluation.config, megatron_miniplm.models.config\n"
            "cfg, _ = config.load(sys.argv[1], environ={})\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'numpy', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "examples", "configs", "paper.yaml")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_section_is_its_stage_config_less_the_pipelines_settings():
    """Every stage setting is a section field or declared as set by the pipeline, never both; the
    stage config built from a section keeps its values."""
    import dataclasses as dc

    from megatron_miniplm.settings import Section, cli_fields

    for f in dc.fields(PipelineConfig):
        section = config._hint_at([f.name])
        if not (isinstance(section, type) and issubclass(section, Section)):
            continue
        flags = {g.name for g, _ in cli_fields(section.stage)}
        fields = {g.name for g in dc.fields(section)} - section.extras
        assert fields | section.pipeline_sets == flags and not fields & section.pipeline_sets, f.name
    cfg, _ = config.load(None, ["scoring.micro_batch_size=3", "scoring.transformer_impl=local"], environ={})
    score = cfg.scoring.stage_config(data_path="d", load="l", output_prefix="o", tensor_model_parallel_size=1,
                                     pipeline_model_parallel_size=1, expert_model_parallel_size=1, bf16=False, seed=1,
                                     progress=False)
    assert (score.micro_batch_size, score.layers.transformer_impl) == (3, "local")
    with pytest.raises(TypeError, match="missing \\['seed'\\]"):
        cfg.split.stage_config(input_prefix="i", ref_prefix="r", rest_prefix="s")


def test_how_a_run_is_watched_is_not_what_it_makes():
    """Logging sinks (tensorboard, W&B) stay out of a stage's fingerprint: a rerun that only
    adds them skips every stage; a setting that changes the model does not."""
    from megatron_miniplm.pipeline.stages import Graph

    base = Graph(config.load(None, ["bf16=false"], environ={})[0])
    watched = Graph(config.load(None, ["bf16=false", "wandb.project=p", "wandb.mode=offline",
                                       "student.train.tensorboard_dir=/tb", "reference.train.log_interval=1",
                                       "student.train.log_interval=7", "preprocess.log_skipped=0"], environ={})[0])
    changed = Graph(config.load(None, ["bf16=false", "student.train.lr=0.0005"], environ={})[0])
    prints = lambda g: {s.name: s.fingerprint for s in g.stages}  # noqa: E731
    assert prints(watched) == prints(base)
    assert prints(changed)["student-miniplm"] != prints(base)["student-miniplm"]


def test_every_training_stage_logs_to_one_wandb_group(tmp_path):
    """wandb.project gives each training stage its W&B run, named after the stage, grouped by the
    work directory; a stage's own wandb_* settings are the pipeline's."""
    from megatron_miniplm.pipeline.stages import Graph
    from megatron_miniplm.settings import to_argv

    cfg, _ = config.load(None, ["bf16=false", f"work_dir={tmp_path / 'runs'}", "wandb.project=p",
                                "wandb.mode=offline"], environ={})
    graph = Graph(cfg)
    argv = to_argv(graph.train_config(cfg.student, "out", {"data": "d"}, "x", 5, stage="student-uniform"))
    flags = dict(zip(argv[::1], argv[1:]))
    assert (flags["--wandb-project"], flags["--wandb-group"], flags["--wandb-exp-name"], flags["--wandb-mode"]) == \
        ("p", "runs", "student-uniform", "offline")
    plain = Graph(config.load(None, ["bf16=false"], environ={})[0])
    assert not any(a.startswith("--wandb") for a in to_argv(plain.train_config(cfg.student, "o", {"data": "d"}, "x", 5)))
    with pytest.raises(ConfigError, match="student.train.wandb_project: set by the pipeline itself"):
        config.load(None, ["student.train.wandb_project=p"], environ={})


def test_student_sizes_name_the_students_of_every_method():
    from megatron_miniplm.pipeline.stages import Graph

    cfg, _ = config.load(None, ["student.sizes=[qwen-104M, {num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, "
                                "num_attention_heads: 2}]", "student_runs=2", "selection.baselines=[uniform, all]"],
                         environ={})
    graph = Graph(cfg)
    assert [label for _, label, _ in graph.students[::2]] == [
        "student-miniplm@qwen-104M", "student-uniform@qwen-104M", "student-all@qwen-104M",
        "student-miniplm@L2-H64", "student-uniform@L2-H64", "student-all@L2-H64"]
    assert graph.students[1][0] == "student-miniplm@qwen-104M-seed1235"
    assert graph.student_model("qwen-104M").model == {"preset": "qwen-104M"}
    assert graph.student_model("L2-H64").model["hidden_size"] == 64 and graph.student_model("").model == cfg.student.model
    # the 'all' baseline trains on the split's rest (all of D), its budget read from MiniPLM's selection
    stage = graph["student-all@L2-H64"]
    assert stage.settings["data"] == "rest" and {"split", "select", "data"} == set(stage.deps)


def test_expert_parallelism_reaches_where_the_teacher_is_scored():
    """parallel.expert_model_parallel_size goes to the teacher's scoring and to the evaluation (which
    applies it to the checkpoints with experts); the reference's scoring and the trainings run at 1.
    Only those two stages' fingerprints change with it."""
    from megatron_miniplm.pipeline.stages import Graph

    base = Graph(config.load(None, ["bf16=false", "parallel.nproc_per_node=2"], environ={})[0])
    ep2 = Graph(config.load(None, ["bf16=false", "parallel.nproc_per_node=2", "parallel.expert_model_parallel_size=2"],
                            environ={})[0])
    dirs = {stage.name: f"/dirs/{stage.name}" for stage in ep2.stages}

    def flag(stage):
        argv = ep2[stage].commands("/out", dirs)[-1]
        return argv[argv.index("--expert-model-parallel-size") + 1] if "--expert-model-parallel-size" in argv else None

    assert [flag(s) for s in ("score-teacher", "evaluate", "score-reference")] == ["2", "2", None]
    assert ep2.train_config(ep2.cfg.student, "out", {"data": "d"}, "x", 5).expert_model_parallel_size == 1
    changed = {s.name for s in ep2.stages if s.fingerprint != base[s.name].fingerprint}
    assert "score-teacher" in changed and "evaluate" in changed
    assert not changed & {"data", "split", "reference", "score-reference", "teacher"}
    with pytest.raises(ConfigError, match="scoring.expert_model_parallel_size: set by the pipeline itself, from "
                                         "parallel.expert_model_parallel_size"):
        config.load(None, ["scoring.expert_model_parallel_size=2"], environ={})


def test_expert_parallelism_divides_the_ranks_and_the_teacher_s_experts():
    from megatron_miniplm.pipeline.invariants import _experts

    assert _experts(1, 3, {"num_attention_heads": 4}) == []  # EP 1: nothing is split
    assert _experts(2, 4, {"num_experts": 8}) == [] and _experts(2, 2, None) == []
    assert _experts(4, 4, {"num_local_experts": 6}) == [
        "parallel.expert_model_parallel_size 4 does not divide the teacher's 6 experts"]
    assert _experts(4, 6, {"num_experts": 8}) == [
        "parallel.expert_model_parallel_size 4 does not divide the 6 data-parallel ranks (nodes x processes / "
        "(tensor x pipeline parallel sizes))"]


@pytest.mark.parametrize("override,message", [
    ("student.train.micro_batch_size=0", "student.train.micro_batch_size 0: must be at least 1"),
    ("parallel.tensor_model_parallel_size=0", "parallel.tensor_model_parallel_size 0: must be at least 1"),
    ("parallel.nproc_per_node=0", "parallel.nproc_per_node 0: must be at least 1"),
    ("reference.train.global_batch_size=-16", "reference.train.global_batch_size -16: must be at least 1"),
    ("scoring.micro_batch_size=0", "scoring.micro_batch_size 0: must be at least 1"),
    ("preprocess.workers=0", "preprocess.workers 0: must be at least 1"),
    ("corpus.demo_chars_per_domain=-1", "corpus.demo_chars_per_domain -1: must be at least 1"),
    ("parallel.master_port=99999", "parallel.master_port 99999: a TCP port, 1 to 65535"),
])
def test_zero_and_negative_sizes_are_refused_before_the_layout_divides_by_them(override, message, tmp_path):
    from megatron_miniplm.pipeline import invariants, stages

    cfg, _ = config.load(None, [override, f"teacher.load={tmp_path}"], environ={})
    with pytest.raises(ConfigError, match=message):
        invariants.check(stages.Graph(cfg))


@pytest.mark.parametrize("text,value", [("--bf16", True), ("true", True), ("1", True), ("", False),
                                        ("false", False), ("0", False), ("auto", "auto")])
def test_bf16_from_the_environment(text, value):
    cfg, _ = config.load(None, environ={"BF16": text})
    assert cfg.bf16 == value
    with pytest.raises(ConfigError, match=r"^\$BF16: 'garbage': --bf16, true or 1; empty, false or 0; or auto"):
        config.load(None, environ={"BF16": "garbage"})


@pytest.mark.parametrize("text,message", [
    ("seed: 1\nseed: 2\n", "c.yaml:2: seed is given twice (first at line 1)"),
    ("selection:\n  alpha: 0.3\n  alpha: 0.4\n", "c.yaml:3: selection.alpha is given twice (first at line 2)"),
    ("", "c.yaml: the config file is empty"),
    ("# nothing but a comment\n", "c.yaml: the config file is empty"),
    ("- seed\n", "c.yaml:1: the config must be a mapping of sections, got list"),
    ("seed: 3\nselection:\n  alpah: 0.3\n", "c.yaml:3: selection.alpah: not a setting of SelectionConfig"),
    ("seed: 3\nstudent:\n  train: {lr: fast}\n", "c.yaml:3: student.train.lr: expected a number, got 'fast'"),
    ("parallel: 4\n", "c.yaml:1: parallel: expected a mapping of Parallel settings, got 4"),
])
def test_a_config_file_s_refusals_name_its_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path.parent}/{message}")):
        config.load(str(path), environ={})


def test_overrides_and_environment_variables_are_named_in_refusals(tmp_path):
    with pytest.raises(ConfigError, match=r"^\$ALPHA: selection.alpha: expected a number, got 'abc'"):
        config.load(None, environ={"ALPHA": "abc"})
    with pytest.raises(ConfigError, match=r"^command line: selection: expected a mapping of SelectionConfig"):
        config.load(None, ["selection=3"], environ={})
    with pytest.raises(ConfigError, match=r"^\$REF_MODEL: model flags '--num-layrs 2': unrecognized arguments: "
                                          r"--num-layrs 2$"):
        config.load(None, environ={"REF_MODEL": "--num-layrs 2"})
    with pytest.raises(ConfigError, match=r"^\$STUDENT_MODEL: model flags '--num-layers two': argument --num-layers: "
                                          r"invalid int value: 'two'$"):
        config.load(None, environ={"STUDENT_MODEL": "--num-layers two"})
    with pytest.raises(ConfigError, match="selection.alpha: no such config file \\(an override is key=value\\)"):
        config.load("selection.alpha", environ={})
    anchors = tmp_path / "a.yaml"  # a merge key's settings may be given again beside it
    anchors.write_text("reference:\n  train: &t {lr: 0.01, micro_batch_size: 2}\n"
                       "student:\n  train:\n    <<: *t\n    lr: 0.02\n")
    cfg, sources = config.load(str(anchors), environ={})
    assert (cfg.student.train.lr, cfg.student.train.micro_batch_size) == (0.02, 2)
    assert sources["student.train.lr"] == f"{anchors}:6"


def test_a_config_that_cannot_run_names_where_each_setting_was_given(tmp_path):
    from megatron_miniplm.pipeline import invariants, stages

    path = tmp_path / "c.yaml"
    path.write_text(f"teacher: {{load: {tmp_path}}}\nselection:\n  alpha: 1.5\nstudent:\n  epochs: 0\n")
    cfg, sources = config.load(str(path), ["parallel.tensor_model_parallel_size=3"], environ={"SEQ_LENGTH": "1"})
    with pytest.raises(ConfigError) as e:
        invariants.check(stages.Graph(cfg), sources)
    problems = str(e.value).splitlines()[1:]
    assert f"  - {path}:3: selection: alpha must be in (0, 1], got 1.5" in problems
    assert f"  - {path}:5: student.epochs 0: must be positive" in problems
    assert "  - $SEQ_LENGTH: seq_length 1: needs at least 2" in problems
    assert ("  - command line: parallel.tensor_model_parallel_size 3 does not divide the 4 attention heads / 4 "
            "key-value heads of student.model") in problems


@pytest.mark.parametrize("text,message", [
    ("selection: {alpha: 0.3\nseed: 1\n", "c.yaml:2:5: YAML syntax: expected ',' or '}', but got ':' "
                                         "(while parsing a flow mapping, line 1)"),
    ("selection:\n\talpha: 0.3\n", "c.yaml:2:1: YAML syntax: found character '\\t' that cannot start any token "
                                   "(YAML indents with spaces, not tabs)"),
])
def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(str(path), environ={})
    assert str(e.value) == f"{path.parent}/{message}"
