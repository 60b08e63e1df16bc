"""The pipeline with a tiny Qwen3 teacher (QK-norm, heads wider than hidden / heads): imported,
scored, a MiniPLM student trained on its selection, all evaluated; one process, no baselines."""

import json
import os

from conversion.tiny_hf_models import save_hf
from distributed import free_port
from pipeline_helpers import run_pipeline, tiny_config, write_config


def test_a_qwen3_teacher_runs_through_the_pipeline(setting, tmp_path):
    _, train, test = setting
    teacher = tmp_path / "qwen3-teacher"
    save_hf("qwen3", str(teacher))
    config = tiny_config((str(teacher), train, test), tmp_path / "work",
                         teacher={"load": str(teacher), "name": "tiny-qwen3"}, vanilla_kd={"enabled": False},
                         selection={"alpha": 0.5, "baselines": []})
    out = run_pipeline(write_config(tmp_path / "qwen3.yaml", config), "parallel.nproc_per_node=1",
                       f"parallel.master_port={free_port()}")
    assert out.returncode == 0, out.stdout[-4000:]
    with open(tmp_path / "work" / "records" / "teacher.json") as f:
        checkpoint = json.load(f)["output"]
    found = [os.path.join(d, name) for d, _, files in os.walk(checkpoint) for name in files
             if name == "model_config.json"]
    model = json.load(open(found[0]))
    assert model["qk_layernorm"] and model["kv_channels"] == 24
    with open(tmp_path / "work" / "records" / "evaluate.json") as f:
        results = json.load(open(os.path.join(json.load(f)["output"], "results.json")))["models"]
    assert set(results) == {"teacher (tiny-qwen3)", "reference", "student-miniplm"}
    assert all(r["instances"] > 0 for r in results.values())
