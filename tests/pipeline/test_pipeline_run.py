"""The whole pipeline on a tiny setting: one node with two processes, every kind of student
(MiniPLM's, the uniform baseline, Vanilla KD, SeqKD); an unchanged rerun skips everything; a changed alpha reruns exactly the selection, the students and the evaluation;
two launchers as two nodes give the one-node results; --dry-run writes nothing; the
invariants refuse before anything runs."""

import json
import os
import subprocess
import sys

import pytest

from pipeline_helpers import PIPELINE, run_pipeline, tiny_config, write_config
from distributed import free_port

SINGLE_STAGES = ("teacher", "data", "split", "select")


def _results(work_dir):
    with open(os.path.join(work_dir, "records", "evaluate.json")) as f:
        out = json.load(f)["output"]
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["models"]


def _evaluation(work_dir):
    with open(os.path.join(work_dir, "records", "evaluate.json")) as f:
        out = json.load(f)["output"]
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _stages(output, what):
    """Stage names the run's plan ('STAGE RUN|skip  REASON' lines) reports as run ('RUN') or
    skipped ('skip')."""
    lines = output.split("\n=== stage", 1)[0].splitlines()
    return [words[0] for words in map(str.split, lines) if len(words) > 1 and words[1] == what]


@pytest.fixture(scope="module")
def one_node(setting, tmp_path_factory):
    """The pipeline on one node with two processes (DP=2), with a SeqKD student."""
    root = tmp_path_factory.mktemp("one-node")
    config = write_config(root / "tiny.yaml", tiny_config(
        setting, root / "work", seqkd={"enabled": True, "prompt_length": 8, "micro_batch_size": 16}))
    out = run_pipeline(config, "parallel.nproc_per_node=2", f"parallel.master_port={free_port()}")
    assert out.returncode == 0, out.stdout[-4000:]
    return root, config, out.stdout


def test_it_runs_and_reports(one_node):
    root, _, output = one_node
    results = _results(root / "work")
    assert set(results) == {"student-miniplm", "student-uniform", "student-vanilla-kd", "student-seqkd",
                            "reference", "teacher (tiny-qwen2)"}
    assert all(r["instances"] > 0 for r in results.values())
    # same steps for the students of a selection; the Vanilla KD student's steps give it their
    # training FLOPs, its teacher's forward counted: equal to the nearest whole step
    flops = {k: r.get("train_flops") for k, r in results.items()}
    plain, kd = flops["student-miniplm"], flops["student-vanilla-kd"]
    kd_out = json.load(open(root / "work" / "records" / "student-vanilla-kd.json"))["output"]
    kd_steps = int(open(os.path.join(kd_out, "ckpt", "latest_checkpointed_iteration.txt")).read())
    assert plain == flops["student-uniform"] and abs(kd - plain) <= 0.5 * kd / kd_steps
    assert flops["teacher (tiny-qwen2)"] is None
    assert "train FLOPs" in output
    # MiniPLM against each other model, overall and per domain, with the sentence it supports
    ev = _evaluation(root / "work")
    assert list(ev["comparisons"]) == ["student-uniform", "student-vanilla-kd", "student-seqkd", "reference",
                                       "teacher (tiny-qwen2)"]
    assert set(ev["models"]["student-miniplm"]["domains"]) == {"pattern", "noise"}
    assert set(ev["comparisons"]["student-uniform"]["domains"]) == {"pattern", "noise"}
    assert len(ev["verdicts"]) == 5 and all(v in output for v in ev["verdicts"])
    assert "student-vanilla-kd trained with" in ev["verdicts"][1] or "at equal training FLOPs" in ev["verdicts"][1]
    assert "FLOPs" not in ev["verdicts"][4]  # the teacher's training cost is not known
    assert "LM loss per domain" in output and "Evaluation report: " in output
    assert os.path.exists(ev["report"]) and open(ev["curves"], "rb").read(4) == b"\x89PNG"
    assert "Selection: kept fraction per domain" in output and "| noise |" in output
    assert (root / "work" / "pipeline_config.yaml").exists()
    from megatron_miniplm.dist_checkpoint import latest_checkpoint

    record = json.load(open(root / "work" / "records" / "student-miniplm.json"))
    checkpoint = latest_checkpoint(os.path.join(record["output"], "ckpt"))
    student = json.load(open(os.path.join(checkpoint, "run_config.json")))
    assert student["seed"] == 1234 and student["seq_length"] == 32  # the run config travels with the checkpoint


def test_an_unchanged_rerun_skips_everything(one_node):
    root, config, _ = one_node
    out = run_pipeline(config, "parallel.nproc_per_node=2")
    assert out.returncode == 0, out.stdout[-3000:]
    assert _stages(out.stdout, "RUN") == [], out.stdout.split("\n=== stage", 1)[0][-3000:]
    assert len(_stages(out.stdout, "skip")) == 13
    assert "student-miniplm" in out.stdout  # the table is printed again


def test_dry_run_changes_nothing(one_node):
    root, config, _ = one_node
    before = sorted((p, os.path.getmtime(os.path.join(p, f))) for p, _, fs in os.walk(root / "work") for f in fs)
    out = run_pipeline(config, "selection.alpha=0.3", "parallel.nproc_per_node=2", "--dry-run")
    assert out.returncode == 0 and "# resolved pipeline config" in out.stdout
    assert "selection.alpha 0.5 -> 0.3" in out.stdout
    after = sorted((p, os.path.getmtime(os.path.join(p, f))) for p, _, fs in os.walk(root / "work") for f in fs)
    assert before == after


@pytest.mark.parametrize("override,reruns", [
    ("student.model.num_layers=4", ["student-miniplm", "student-uniform", "student-vanilla-kd", "student-seqkd",
                                    "evaluate"]),
    ("vanilla_kd.kd_ratio=0.9", ["student-vanilla-kd", "evaluate"]),
    ("student_seeds=[1234,7]", ["student-miniplm-seed7", "student-uniform-seed7", "student-vanilla-kd-seed7",
                                "student-seqkd-seed7", "evaluate"]),
    ("teacher.name=another", ["evaluate"]),
    ("reference.train.log_interval=1", []),  # how a run is logged is not what it makes
    ("preprocess.log_skipped=0", []),
    ("student.train.save_interval=5", []),  # when a run saves or syncs is not what it makes
    ("scoring.fsync=false", []),
    ("selection.num_threads=1", []),  # the selection is the same at any thread count
    # SeqKD's student trains to the selection's token budget: it reads the selection too
    ("scoring.micro_batch_size=4", ["score-teacher", "score-reference", "select", "student-miniplm",
                                    "student-uniform", "student-vanilla-kd", "student-seqkd", "evaluate"]),
    ("seqkd.temperature=0.5", ["generate-seqkd", "student-seqkd", "evaluate"]),
    ("seed=99", ["split", "reference", "score-teacher", "score-reference", "select", "generate-seqkd",
                 "student-miniplm", "student-uniform", "student-vanilla-kd", "student-seqkd", "evaluate"]),
])
def test_a_change_reruns_exactly_the_stages_that_depend_on_it(one_node, override, reruns):
    _, config, _ = one_node
    out = run_pipeline(config, override, "parallel.nproc_per_node=2", "--dry-run", timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    planned = [line.split()[1] for line in out.stdout.split("# stages", 1)[1].splitlines() if " RUN " in line]
    assert planned == reruns


def _copy_of_the_run(root, config, name):
    """The one-node run's work directory copied, and a config pointing at the copy."""
    import yaml

    copy = root / name
    subprocess.run(["cp", "-a", str(root / "work"), str(copy)], check=True)
    # the records name absolute output paths: point the copy's config at the copy
    data = yaml.safe_load(open(config))
    data["work_dir"] = str(copy)
    for record in os.listdir(copy / "records"):
        path = copy / "records" / record
        if record.endswith(".json"):
            path.write_text(path.read_text().replace(str(root / "work"), str(copy)))
    return copy, write_config(root / f"{name}.yaml", data)


def test_a_changed_alpha_reruns_exactly_what_reads_it(one_node):
    """(Without the distilled students, whose reruns the planning tests above cover.)"""
    root, config, _ = one_node
    copy, config2 = _copy_of_the_run(root, config, "alpha")
    before = _results(copy)
    out = run_pipeline(config2, "selection.alpha=0.3", "vanilla_kd.enabled=false", "seqkd.enabled=false",
                       "parallel.nproc_per_node=2", f"parallel.master_port={free_port()}")
    assert out.returncode == 0, out.stdout[-3000:]
    assert _stages(out.stdout, "RUN") == ["select", "student-miniplm", "student-uniform", "evaluate"]
    after = _results(copy)
    assert after["reference"]["lm_loss"] == before["reference"]["lm_loss"]  # the same reference model
    assert after["student-miniplm"]["lm_loss"] != before["student-miniplm"]["lm_loss"]


def test_a_moved_work_directory_names_its_own_files(one_node):
    """A finished work directory copied elsewhere skips every stage and its summary names the
    copy's files, none of the original's."""
    root, config, _ = one_node
    moved = root / "moved"
    subprocess.run(["cp", "-a", str(root / "work"), str(moved)], check=True)
    import yaml

    data = yaml.safe_load(open(config))
    data["work_dir"] = str(moved)
    out = run_pipeline(write_config(root / "moved.yaml", data), "parallel.nproc_per_node=2",
                       f"parallel.master_port={free_port()}")
    assert out.returncode == 0, out.stdout[-3000:]
    assert _stages(out.stdout, "RUN") == [], out.stdout.split("\n=== stage", 1)[0][-3000:]
    assert "Evaluation report: " + str(moved) in out.stdout
    assert str(root / "work") + os.sep not in out.stdout


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


STUDENTS = ["student-miniplm", "student-uniform", "student-vanilla-kd", "student-seqkd"]


@pytest.mark.parametrize("pattern,damage,override,why,reruns", [
    # a truncated dataset: its size no longer matches the record, whatever runs
    ("data/*/train.bin", _truncate, None, "bytes, ", ["data", "split", "reference", "score-teacher",
                                                      "score-reference", "select", "generate-seqkd", *STUDENTS,
                                                      "evaluate"]),
    # flipped bytes in a score file: found before the selection that reads it runs
    ("score-teacher/*/scores.npy", _flip_last_byte, "selection.alpha=0.3", "changed since it was made",
     ["score-teacher", "select", *STUDENTS, "evaluate"]),
    # a checkpoint shard gone
    ("reference/*/ckpt/iter_*/__0_1.distcp", os.remove, None, "is missing",
     ["reference", "score-reference", "select", *STUDENTS, "evaluate"]),
    # an altered blend: found before the students that train on it run
    ("select/*/miniplm.npy", _flip_last_byte, "student.train.lr=0.002", "changed since it was made",
     ["select", *STUDENTS, "evaluate"]),
])
def test_a_damaged_artifact_is_made_again_before_use(one_node, pattern, damage, override, why, reruns):
    """An artifact damaged after its stage finished is not used: the stage that made it runs
    again from scratch, and every stage reading it, naming the file and what is wrong."""
    import glob

    root, config, _ = one_node
    copy, config2 = _copy_of_the_run(root, config, "damaged-" + pattern.split("/")[0])
    path, = glob.glob(str(copy / pattern))
    damage(path)
    out = run_pipeline(config2, *([override] if override else []), "parallel.nproc_per_node=2", "--dry-run",
                       timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    stages = out.stdout.split("# stages", 1)[1].splitlines()
    assert [line.split()[1] for line in stages if " RUN " in line] == reruns
    assert any(f"its output is damaged: {path}" in line and why in line for line in stages), stages


def test_students_with_another_tokenizer(setting, one_node):
    """KD across model families: the selections exported as text and re-tokenized with the
    students' own tokenizer (a byte-level BPE; the teacher's is word-level)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_miniplm.dist_checkpoint import latest_checkpoint
    from megatron_miniplm.data.tokenizer import file_sha256

    root, config, _ = one_node
    copy, config2 = _copy_of_the_run(root, config, "cross")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([json.loads(l)["text"] for l in open(setting[1])], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    student_tokenizer = root / "student-tokenizer"
    student_tokenizer.mkdir()
    tok.save(str(student_tokenizer / "tokenizer.json"))
    out = run_pipeline(config2, f"student_tokenizer={student_tokenizer}", "vanilla_kd.enabled=false",
                       "seqkd.enabled=false", "parallel.nproc_per_node=2", f"parallel.master_port={free_port()}")
    assert out.returncode == 0, out.stdout[-3000:]
    assert _stages(out.stdout, "RUN") == ["retokenize", "student-miniplm", "student-uniform", "evaluate"]
    results = _results(copy)
    assert set(results) == {"student-miniplm", "student-uniform"}  # one unit of loss: the students' tokenizer
    for name in results:
        ckpt = latest_checkpoint(results[name]["runs"][0]["checkpoint"])
        info = json.load(open(os.path.join(ckpt, "checkpoint_info.json")))
        assert info["tokenizer"]["sha256"] == file_sha256(str(student_tokenizer / "tokenizer.json"))
    with open(os.path.join(copy, "records", "retokenize.json")) as f:
        retokenized = json.load(f)["output"]
    assert os.path.exists(os.path.join(retokenized, "miniplm.jsonl.zst"))


def test_two_nodes_match_one_node(setting, one_node, tmp_path):
    """Two launcher processes as two nodes (one process each, one shared work directory):
    each single-process stage runs once, on node 0, and the results are the one-node run's
    (without the distilled students, which the one-node run covers)."""
    root, _, _ = one_node
    config = write_config(tmp_path / "tiny.yaml", tiny_config(setting, tmp_path / "work",
                                                              vanilla_kd={"enabled": False}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ALPHA", "WORK_DIR")}
    procs = [subprocess.Popen([sys.executable, PIPELINE, config, "parallel.nnodes=2", f"parallel.node_rank={r}",
                               "parallel.nproc_per_node=1", f"parallel.master_port={port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "OMP_NUM_THREADS": "1"}) for r in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    for tool in ("convert_checkpoint.py", "preprocess_data.py", "split_dataset.py", "difference_sample.py"):
        assert tool in logs[0] and tool not in logs[1], tool  # single-process stages: node 0 only
    assert logs[1].count("done by node 0") == len(SINGLE_STAGES)
    want, got = _results(root / "work"), _results(tmp_path / "work")
    assert got.keys() == want.keys() - {"student-vanilla-kd", "student-seqkd"}
    for name in got:
        assert got[name]["lm_loss"] == pytest.approx(want[name]["lm_loss"], abs=1e-4), name


@pytest.mark.parametrize("override,message", [
    ("parallel.tensor_model_parallel_size=3", "does not divide the 2 attention heads"),
    ("parallel.pipeline_model_parallel_size=4", "does not divide the teacher's 2 layers"),
    ("parallel.expert_model_parallel_size=2", "parallel.expert_model_parallel_size 2: the teacher (teacher.load) "
                                              "has no experts to split"),
    ("parallel.expert_model_parallel_size=2", "parallel.expert_model_parallel_size 2 does not divide the 1 "
                                              "data-parallel ranks"),
    ("tokenizer=OTHER", "differs from the teacher's"),
    ("seq_length=1000", "exceeds the teacher's 256 positions"),
    ("selection.baselines=[uniform,random]", "selection.baselines"),
    ("selection.alpha=null", "give exactly one of alpha"),
    ("split.ref_fraction=1.5", "split: ref_fraction must be in (0, 1)"),
    ("student.train.global_batch_size=7", "global_batch_size 7 is not divisible"),
    ("student.epochs=0", "student.epochs 0"),
    ("corpus.test=null", "corpus.test is not"),
    ("selection.baselines=[teacher]", "vanilla_kd.enabled needs the uniform baseline"),
    ("vanilla_kd.kd_ratio=2", "vanilla_kd: kd_ratio (--kd-ratio) must be in [0, 1]"),
    ("student_seeds=[3,3]", "student_seeds [3, 3]: a non-empty list of distinct integers"),
    ("student_tokenizer=/nonexistent/tok.json", "student_tokenizer: /nonexistent/tok.json does not exist"),
    ("student_tokenizer=DIR", "vanilla_kd.enabled with student_tokenizer: Vanilla KD needs the teacher's vocabulary"),
    ("corpus.train=[/nonexistent/*.jsonl]", "no file matches"),
    ("evaluation.saving_baseline=student-unifrom", "evaluation.saving_baseline 'student-unifrom': not a student"),
])
def test_invariants_refuse_naming_the_settings(setting, tmp_path, override, message):
    from megatron_miniplm.pipeline import config, invariants, stages

    if override == "tokenizer=OTHER":
        other = tmp_path / "other.json"
        other.write_text('{"model": {"type": "WordLevel", "vocab": {"a": 0}}}')
        override = f"tokenizer={other}"
    if override == "student_tokenizer=DIR":  # a directory that exists (its files are fingerprinted: keep it small)
        override = f"student_tokenizer={tmp_path}"
    path = write_config(tmp_path / "tiny.yaml", tiny_config(setting, tmp_path / "work"))
    cfg, _ = config.load(path, [override], environ={})
    with pytest.raises(config.ConfigError) as refused:
        invariants.check(stages.Graph(cfg))
    assert message in str(refused.value)


def test_a_refused_config_exits_1_before_anything_runs(setting, tmp_path):
    path = write_config(tmp_path / "tiny.yaml", tiny_config(setting, tmp_path / "work"))
    out = run_pipeline(path, "parallel.tensor_model_parallel_size=3", "seq_length=1000", timeout=120)
    assert out.returncode == 1, out.stdout[-2000:]
    assert "does not divide" in out.stdout and "exceeds the teacher's" in out.stdout  # all problems at once
    assert not (tmp_path / "work").exists()


def test_the_evaluation_section_reaches_the_tool(setting, tmp_path):
    """The evaluate stage's command, parsed by tools/evaluate.py, gives back the section's
    settings over EvalConfig's defaults and the settings the pipeline owns."""
    from megatron_miniplm.cli import evaluate
    from megatron_miniplm.evaluation.config import EvalConfig
    from megatron_miniplm.pipeline import config, stages
    from megatron_miniplm.settings import from_args

    path = write_config(tmp_path / "tiny.yaml", tiny_config(setting, tmp_path / "work"))
    cfg, _ = config.load(path, ["evaluation.tasks=miniplm", "evaluation.confidence=0.9", "seed=77"], environ={})
    graph = stages.Graph(cfg)
    dirs = {stage.name: f"/dirs/{stage.name}" for stage in graph.stages}
    (argv,) = graph["evaluate"].commands("/out", dirs)
    assert argv[1].endswith(os.path.join("tools", "evaluate.py"))
    got = from_args(EvalConfig, evaluate.build_parser().parse_args(argv[2:]))
    assert got.tasks == "miniplm" and got.confidence == 0.9 and got.bootstrap_seed == 77
    assert got.micro_batch_size == EvalConfig.micro_batch_size  # a default the section leaves alone
    assert got.data_path == "/dirs/data/test" and got.json == "/out/results.json"
    assert got.labels[:2] == ["student-miniplm", "student-uniform"] and len(got.metrics_file) == len(got.load)


def test_a_new_scores_version_redoes_the_stages_that_read_logits(setting, tmp_path, monkeypatch):
    """Scores computed by other code are not reused: the stages that turn a model's logits into
    numbers (scoring, Vanilla KD, evaluation) and those after them get new fingerprints, the
    others keep theirs."""
    from megatron_miniplm.pipeline import config, stages

    path = write_config(tmp_path / "tiny.yaml", tiny_config(setting, tmp_path / "work"))
    cfg, _ = config.load(path, [], environ={})
    before = {s.name: s.fingerprint for s in stages.Graph(cfg).stages}
    monkeypatch.setattr(stages, "SCORES_VERSION", stages.SCORES_VERSION + 1)
    after = {s.name: s.fingerprint for s in stages.Graph(cfg).stages}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"score-teacher", "score-reference", "select", "student-miniplm", "student-uniform",
                       "student-vanilla-kd", "evaluate"}, changed


def _output(work_dir, stage):
    with open(os.path.join(work_dir, "records", f"{stage}.json")) as f:
        return json.load(f)["output"]


def test_a_seqkd_student_is_trained_and_reported(one_node):
    """SeqKD (seqkd.enabled): the teacher generates a corpus from prompts of the split's rest,
    data-parallel; the student trains on it for the steps of the other students, and the table
    shows the teacher's forward FLOPs that generated it."""
    root, _, output = one_node
    work = root / "work"
    models = _results(work)
    generated = os.path.join(_output(work, "generate-seqkd"), "seqkd")
    meta = json.load(open(generated + ".meta.json"))
    rest = json.load(open(os.path.join(_output(work, "split"), "rest.meta.json")))
    assert meta["num_instances"] == rest["num_instances"]  # one sequence per prompt instance
    assert meta["seq_length"] == 32 and meta["domains"] == rest["domains"]
    assert models["student-seqkd"]["generation_flops"] == meta["generation"]["teacher_forward_flops"] > 0
    assert "generation_flops" not in models["student-uniform"]
    # same steps, and so the same training FLOPs, as the students of a selection
    steps = {s: open(os.path.join(_output(work, s), "ckpt", "latest_checkpointed_iteration.txt")).read()
             for s in ("student-seqkd", "student-uniform")}
    assert steps["student-seqkd"] == steps["student-uniform"]
    assert models["student-seqkd"]["train_flops"] == models["student-uniform"]["train_flops"]
    assert "gen FLOPs" in output and "student-seqkd" in output
