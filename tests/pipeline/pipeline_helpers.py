"""Running tools/pipeline.py in tests on the tiny setting of conftest.py."""

import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIPELINE = os.path.join(REPO, "tools", "pipeline.py")
TINY_MODEL = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2}
TINY_TRAIN = {"lr": 0.003, "micro_batch_size": 2, "global_batch_size": 8, "eval_iters": 2, "log_interval": 5}


def tiny_config(setting, work_dir, **top) -> dict:
    teacher, train, test = setting
    return {"work_dir": str(work_dir), "seq_length": 32, "corpus": {"train": [train], "test": [test]},
            "teacher": {"load": teacher, "name": "tiny-qwen2"}, "preprocess": {"workers": 1},
            "split": {"ref_fraction": 0.3},
            "reference": {"model": TINY_MODEL, "epochs": 1, "train": TINY_TRAIN},
            "student": {"model": TINY_MODEL, "epochs": 1, "train": TINY_TRAIN},
            "vanilla_kd": {"enabled": True}, "student_runs": 1, **top}


def write_config(path, data) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def run_pipeline(*args, env=None, timeout=900):
    """tools/pipeline.py in a fresh process; its CompletedProcess (stdout and stderr merged)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ALPHA", "WORK_DIR", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "TEACHER", "SEED")}
    return subprocess.run([sys.executable, PIPELINE, *args], env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
