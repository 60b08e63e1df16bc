"""The pipeline with a SeqKD student (seqkd.enabled) on the tiny setting, on the CPU: the teacher
generates a corpus from prompts of the split's rest, the student trains on it for the steps of
the other students, and the table shows the teacher's forward FLOPs that generated it."""

import json
import os

from pipeline_helpers import run_pipeline, tiny_config, write_config


def _output(work_dir, stage):
    with open(os.path.join(work_dir, "records", f"{stage}.json")) as f:
        return json.load(f)["output"]


def test_a_seqkd_student_is_trained_and_reported(setting, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(
        setting, tmp_path / "work", vanilla_kd={"enabled": False},
        seqkd={"enabled": True, "prompt_length": 8, "micro_batch_size": 16}))
    out = run_pipeline(config)
    assert out.returncode == 0, out.stdout[-4000:]
    work = tmp_path / "work"
    with open(os.path.join(_output(work, "evaluate"), "results.json")) as f:
        models = json.load(f)["models"]
    assert set(models) == {"student-miniplm", "student-uniform", "student-seqkd", "reference", "teacher (tiny-qwen2)"}

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
    assert "gen FLOPs" in out.stdout and "student-seqkd" in out.stdout
