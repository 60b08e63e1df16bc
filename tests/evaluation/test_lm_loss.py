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
    from megatron_miniplm.cli import pretrain_gpt

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
    got = json.load(open(out_json))["models"]["student"]
    assert got["instances"] == 40
    assert got["token_weighted_loss"] == pytest.approx(trainer_loss, abs=1e-4)
    assert got["lm_loss"] != pytest.approx(got["token_weighted_loss"], abs=1e-6)  # different averages


def test_evaluate_reports_domains_seeds_the_paired_difference_and_curves(tmp_path):
    """Two models, one of them with two seeds, on a test set with two domains: the tool's JSON,
    table, markdown report and curve PNG."""
    from megatron_miniplm.evaluation.compare import instance_losses, paired_difference
    from megatron_miniplm.evaluation.report import test_documents
    from megatron_miniplm.evaluation.curves import validation_curve
    from megatron_miniplm.scoring.score_file import load_scores

    train = write_dataset(str(tmp_path / "train"), pattern_instances(160, VOCAB, SEQ + 1, seed=1), VOCAB, SEQ)
    domains = np.arange(40) % 2
    test = write_dataset(str(tmp_path / "test"), pattern_instances(40, VOCAB, SEQ + 1, seed=2), VOCAB, SEQ,
                         domains=domains)
    runs = [("good", 5, "3e-3", 16), ("good", 6, "3e-3", 16), ("short", 5, "3e-3", 4)]
    loads, names, metric_files = [], [], []
    for k, (name, seed, lr, iters) in enumerate(runs):
        ckpt, m = str(tmp_path / f"ckpt{k}"), str(tmp_path / f"m{k}.jsonl")
        run_distributed(_train, 1, [*model_flags("tiny"), "--data-path", train, "--valid-data-path", test,
                                    "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8",
                                    "--eval-iters", "2", "--eval-interval", "4", "--train-iters", str(iters),
                                    "--lr", lr, "--seed", str(seed), "--save", ckpt, "--metrics-file", m])
        loads.append(ckpt), names.append(name), metric_files.append(m)
    out_json, report = tmp_path / "eval.json", tmp_path / "report"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--load", *loads,
                             "--name", *names, "--data-path", test, "--output-dir", str(tmp_path / "ev"),
                             "--report-dir", str(report), "--metrics-file", *metric_files,
                             "--bootstrap-samples", "500", "--json", str(out_json)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    res = json.load(open(out_json))
    good, short = res["models"]["good"], res["models"]["short"]
    assert good["seeds"] == 2 and short["seeds"] == 1 and good["lm_loss_std"] > 0
    assert set(good["domains"]) == {"d0", "d1"} and good["domains"]["d0"]["instances"] == 20
    assert good["train_flops"] == pytest.approx(4 * short["train_flops"])  # 16 vs 4 steps
    # the tool's difference is the pooled paired difference of the scorer's per-instance losses
    scores = {p: load_scores(str(tmp_path / "ev" / p) + "-test")[0] for p in ("good", "good-seed2", "short")}
    documents = test_documents(test, domains)  # every instance here is a document of its own
    assert sorted(documents) == list(range(40))
    want = paired_difference([instance_losses(scores["good"]), instance_losses(scores["good-seed2"])],
                             [instance_losses(scores["short"])], documents=documents, samples=500, seed=0)
    got = res["comparisons"]["short"]["overall"]
    assert got["mean"] == pytest.approx(want.mean) and got["low"] == pytest.approx(want.low)
    assert got["mean"] < 0  # 16 steps beat 4
    # the JSON carries the config it was made with
    assert res["config"]["load"] == loads and res["config"]["bootstrap_samples"] == 500
    compute = f"; short trained with {short['train_flops'] / good['train_flops']:.3g}x the FLOPs of good"
    assert res["verdicts"] == [want.verdict("good", "short") + compute] and res["verdicts"][0] in result.stdout
    assert "LM loss per domain" in result.stdout and "(all)" in result.stdout
    text = open(report / "evaluation_report.md").read()
    assert "| short |" in text and "curves.png" in text
    png = open(report / "curves.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    curve = validation_curve(metric_files[0])
    assert [p["iteration"] for p in curve] == [4, 8, 12, 16]
    assert all(b["consumed_flops"] > a["consumed_flops"] for a, b in zip(curve, curve[1:]))


def _evaluate(argv):
    from megatron_miniplm.cli import evaluate

    assert evaluate.main(argv) == 0


def test_trained_untied_student_exported_to_hf_scores_as_in_the_evaluator(tmp_path):
    """The paper's larger students have untied embeddings: one trained here and exported to HF
    gives, in transformers, the per-instance losses the evaluator reports for it."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_miniplm.scoring.score_file import load_scores

    from megatron_miniplm.cli import convert_checkpoint

    train = write_dataset(str(tmp_path / "train"), pattern_instances(160, VOCAB, SEQ + 1, seed=1), VOCAB, SEQ)
    instances = pattern_instances(16, VOCAB, SEQ + 1, seed=2)
    for x in instances[::2]:  # documents joined inside an instance: EOD mid-sequence, its prediction not counted
        x[len(x) // 2] = 0
    instances[1][0] = 0  # an instance that starts with the EOD of the document before it
    instances[3][2:4] = 0  # two EODs in a row
    # a full-length instance; one token (nothing to predict); EOD then a token, and EODs only (nothing
    # counts); a token then EOD (one prediction: of EOD)
    instances += [np.arange(1, SEQ + 2, dtype=np.int64), np.array([5]), np.array([0, 7]), np.zeros(3, np.int64),
                  np.array([7, 0])]
    test = write_dataset(str(tmp_path / "test"), instances, VOCAB, SEQ)
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    run_distributed(_train, 1, [*model_flags("tiny-untied"), "--data-path", train, "--seq-length", str(SEQ),
                                "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "12",
                                "--lr", "5e-3", "--save", ckpt])
    assert convert_checkpoint.main(["--direction", "megatron-to-hf", "--load", ckpt, "--save", hf]) == 0
    # micro-batches of 3: instances of different lengths padded together
    run_distributed(_evaluate, 1, ["--load", ckpt, "--name", "student", "--data-path", test, "--micro-batch-size", "3",
                                   "--output-dir", str(tmp_path / "ev"), "--bootstrap-samples", "10",
                                   "--json", str(tmp_path / "eval.json")])
    scores = np.asarray(load_scores(str(tmp_path / "ev" / "student-test"))[0])
    reported = json.load(open(tmp_path / "eval.json"))["models"]["student"]

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    means = []
    for x, (nll_sum, count) in zip(instances, scores):
        x = torch.from_numpy(np.asarray(x, dtype=np.int64))
        counted = x[:-1] != 0
        assert count == counted.sum()
        if not counted.any():
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(x[None, :-1]).logits[0].float(), dim=-1)
        nll = -logp.gather(1, x[1:, None]).squeeze(1).double()
        means.append(float(nll[counted].mean()))
        assert nll_sum / count == pytest.approx(means[-1], abs=1e-5)
    assert reported["instances"] == len(means) == len(instances) - 3
    assert reported["lm_loss"] == pytest.approx(np.mean(means), abs=1e-6)
