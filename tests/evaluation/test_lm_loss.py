"""tools/evaluate.py's LM loss: the paper's per-instance mean, and agreement with the trainer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from corpus import pattern_instances, write_dataset
from presets import model_flags
from distributed import run_distributed
from megatron_miniplm.evaluation.lm_loss import lm_loss_from_scores

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, SEQ = 512, 32


def test_mean_of_per_instance_means_not_token_weighted():
    scores = np.array([[10.0, 10.0], [2.0, 1.0], [0.0, 0.0]])  # means 1 and 2; one empty instance
    out = lm_loss_from_scores(scores)
    assert out["lm_loss"] == pytest.approx(1.5)
    assert out["token_weighted_loss"] == pytest.approx(12.0 / 11.0)
    assert out["instances"] == 2 and out["tokens"] == 11
    with pytest.raises(ValueError, match="no instance"):
        lm_loss_from_scores(np.zeros((3, 2)))


def _train(argv):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import pretrain_gpt

    assert pretrain_gpt.main(argv) == 0


def test_evaluate_agrees_with_the_trainers_validation_loss(tmp_path):
    train = write_dataset(str(tmp_path / "train"), pattern_instances(200, VOCAB, SEQ + 1, seed=1), VOCAB, SEQ)
    valid = write_dataset(str(tmp_path / "valid"), pattern_instances(40, VOCAB, SEQ + 1, seed=2), VOCAB, SEQ)
    metrics, ckpt = tmp_path / "m.jsonl", str(tmp_path / "ckpt")
    # 5 eval iterations x 8 = the 40 validation instances, in order: the same tokens as evaluate.py.
    run_distributed(_train, 1, [*model_flags("tiny"), "--data-path", train, "--valid-data-path", valid,
                                "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8",
                                "--eval-iters", "5", "--train-iters", "20", "--lr", "5e-3", "--save", ckpt,
                                "--metrics-file", str(metrics)])
    trainer_loss = [json.loads(l)["valid_loss"] for l in open(metrics) if "valid_loss" in l][-1]
    out_json = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--load", ckpt,
                             "--name", "student", "--data-path", valid, "--output-dir", str(tmp_path / "ev"),
                             "--json", str(out_json)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student" in result.stdout and "LM loss" in result.stdout
    got = json.load(open(out_json))["student"]
    assert got["instances"] == 40
    assert got["token_weighted_loss"] == pytest.approx(trainer_loss, abs=1e-4)
    assert got["lm_loss"] != pytest.approx(got["token_weighted_loss"], abs=1e-6)  # different averages
