"""A tiny MiniPLM setting built here: a random Qwen2-style teacher with a word-level
tokenizer (HF directory), a two-domain Pile-style corpus (learnable patterns and noise),
and a pipeline config with models of a few thousand parameters."""

import json
import random

import pytest


def _document(rng, domain):
    if domain == "pattern":
        start, step = rng.randrange(2, 290), rng.choice([1, 2, 3])
        words = [f"w{2 + (start + step * i) % 297}" for i in range(rng.randrange(20, 60))]
    else:
        words = [f"w{rng.randrange(2, 300)}" for _ in range(rng.randrange(20, 60))]
    return {"text": " ".join(words), "meta": {"pile_set_name": domain}}


@pytest.fixture(scope="session")
def setting(tmp_path_factory):
    """(teacher directory, train.jsonl, test.jsonl)."""
    from conversion.tiny_hf_models import save_hf

    root = tmp_path_factory.mktemp("setting")
    save_hf("qwen2", str(root / "teacher"))
    rng = random.Random(0)
    for name, n in (("train", 240), ("test", 40)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps(_document(rng, "pattern" if i % 2 else "noise")) + "\n")
    return str(root / "teacher"), str(root / "train.jsonl"), str(root / "test.jsonl")
