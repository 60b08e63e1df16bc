"""Zero-shot evaluation through lm-evaluation-harness on a local task, end to end.

A tiny model trained by tools/pretrain_gpt.py on arithmetic progressions is
exported to HF and asked, by lm-eval's HF model, to pick the continuation of a
progression among four: it must beat chance (25%) by far.
"""

import hashlib
import json
import os

import numpy as np
import pytest

from corpus import pattern_instances, write_dataset
from presets import model_flags
from distributed import run_distributed

pytest.importorskip("lm_eval")

VOCAB, SEQ = 128, 32


def word_tokenizer(path: str) -> str:
    """A word-level tokenizer whose ids are the token names: 't17' is id 17, id 0 is EOD."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(path)
    return path


def progression_task(root: str, n: int = 40) -> str:
    rng = np.random.default_rng(9)
    rows = []
    for _ in range(n):
        start, step = int(rng.integers(0, VOCAB - 1)), int(rng.choice([1, 2, 3]))
        seq = [(start + step * k) % (VOCAB - 1) + 1 for k in range(9)]
        wrong = [(seq[-1] + d - 1) % (VOCAB - 1) + 1 for d in (5, 17, 40)]
        choices = [f"t{seq[-1]}"] + [f"t{w}" for w in wrong]
        order = rng.permutation(4)
        rows.append({"context": " ".join(f"t{t}" for t in seq[:-1]),
                     "choices": [choices[i] for i in order], "label": int(np.where(order == 0)[0][0])})
    data = os.path.join(root, "progressions.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(root, "progressions.yaml"), "w") as f:
        f.write(f"""task: local_progressions
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
target_delimiter: " "
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    return root


def _train(argv):
    from megatron_miniplm.cli import pretrain_gpt

    assert pretrain_gpt.main(argv) == 0


def test_lm_eval_local_task_on_a_trained_student(tmp_path, monkeypatch):
    tokenizer = word_tokenizer(str(tmp_path / "tokenizer.json"))
    prefix = write_dataset(str(tmp_path / "train"), pattern_instances(600, VOCAB, SEQ + 1, seed=4), VOCAB, SEQ)
    meta_path = prefix + ".meta.json"
    meta = json.load(open(meta_path))
    meta["tokenizer"].update(path=tokenizer, sha256=hashlib.sha256(open(tokenizer, "rb").read()).hexdigest())
    json.dump(meta, open(meta_path, "w"))
    ckpt = str(tmp_path / "ckpt")
    run_distributed(_train, 1, [
        *model_flags("tiny"), "--vocab-size", str(VOCAB), "--data-path", prefix,
        "--seq-length", str(SEQ), "--micro-batch-size", "8", "--global-batch-size", "16",
        "--train-iters", "150", "--lr", "1e-2", "--lr-warmup-iters", "10", "--save", ckpt,
        "--log-interval", "50",
    ])
    from megatron_miniplm.evaluation.harness import evaluate_checkpoint

    from megatron_miniplm.evaluation import harness

    tasks = progression_task(str(tmp_path))
    # a suite averages the metric it names per task over the tasks that ran; the paper's
    # suite ("miniplm") has no data offline: each of its tasks is reported missing, not a crash
    monkeypatch.setitem(harness.SUITES, "pair", {"local_progressions": "acc", "hellaswag": "acc_norm"})
    results = evaluate_checkpoint(ckpt, ["pair", "miniplm"], include_path=tasks, batch_size=8)
    acc = results["local_progressions"]["acc"]
    assert acc >= 0.75, results
    assert results["pair average"] == {"average": acc, "tasks": 1, "of": 2}
    for task in harness.MINIPLM_TASKS:
        assert "Hub" in results[task]["missing"] or "load" in results[task]["missing"].lower(), results[task]
    assert results["miniplm average"]["tasks"] == 0 and results["miniplm average"]["of"] == 9


def test_unknown_task_is_refused(tmp_path):
    from megatron_miniplm.evaluation.harness import run_tasks

    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_tasks(str(tmp_path), ["no_such_task_here"], include_path=str(tmp_path))


def test_the_paper_suite_names_nine_tasks_with_the_papers_metric():
    from megatron_miniplm.evaluation.harness import MINIPLM_TASKS, expand_tasks

    assert expand_tasks(["miniplm"]) == ["hellaswag", "lambada_openai", "winogrande", "openbookqa", "arc_easy",
                                         "arc_challenge", "piqa", "social_iqa", "storycloze_2018"]
    assert {t for t, m in MINIPLM_TASKS.items() if m == "acc_norm"} == {"hellaswag", "openbookqa", "arc_easy",
                                                                        "arc_challenge", "piqa"}
    assert expand_tasks(["piqa", "miniplm", "piqa"]).count("piqa") == 1
