"""Shared fixtures: tiny tokenizers trained here (no downloads) and a synthetic corpus."""
from __future__ import annotations

import gzip
import io
import json
import os
import random
import warnings

import pytest

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were be this which "
    "or had not but model data token corpus teacher student café naïve 数据 模型 über straße"
).split()
DOMAINS = ("Pile-CC", "Github", "ArXiv", "Wikipedia (en)")


def make_text(rng: random.Random, sentences: int, run_on: bool = False) -> str:
    """Sentences with mixed punctuation and newlines; `run_on`: one long boundary-free run."""
    if run_on:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 300)))
    parts = []
    for _ in range(sentences):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        end = rng.choice([".", ".", "!", "?", ",", ";", "...", '."'])
        sep = rng.choice([" ", " ", " ", "\n", "\n\n", ""])
        parts.append(words.capitalize() + end + sep)
    return "".join(parts).rstrip() or "x"


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.1:
            text = make_text(rng, 0, run_on=True)
        elif kind < 0.2:
            text = make_text(rng, rng.randint(40, 120))  # several instances long
        else:
            text = make_text(rng, rng.randint(1, 12))
        out.append({"text": text, "meta": {"pile_set_name": rng.choice(DOMAINS)}, "id": i})
    return out


def write_jsonl(path: str, records: list, compression: str = "none") -> str:
    """`records`: dicts (dumped) or raw bytes/str lines written as they are."""
    lines = []
    for r in records:
        if isinstance(r, bytes):
            lines.append(r)
        elif isinstance(r, str):
            lines.append(r.encode("utf-8"))
        else:
            lines.append(json.dumps(r, ensure_ascii=False).encode("utf-8"))
    data = b"\n".join(lines) + b"\n"
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return [r["text"] for r in make_records(300, seed=123)]


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, corpus_texts) -> str:
    """A byte-level BPE (GPT-2 style) with an <|endoftext|> special token, as a directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts, trainer)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    return str(d)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory, corpus_texts) -> str:
    """A sentencepiece BPE model with byte fallback; newlines kept (identity normalization)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_texts), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, minloglevel=2, split_by_whitespace=True,
    )
    path = os.path.join(d, "tiny.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


@pytest.fixture
def run_preprocess(tmp_path):
    """preprocess() with test defaults; returns (summary, prefix)."""
    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.data.config import PreprocessConfig

    def run(inputs, tokenizer, name="out", **kw):
        kw.setdefault("progress", False)
        prefix = str(tmp_path / name)
        config = PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=prefix, tokenizer=tokenizer, **kw)
        return preprocess(config), prefix

    return run


def read_instances(prefix: str) -> list:
    """Every instance of a dataset (all shards), as int64 arrays, via megatron-core."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_miniplm.data.meta import dataset_prefixes

    out = []
    for p in dataset_prefixes(prefix):
        ds = IndexedDataset(p)
        out.extend(np.asarray(ds[i], dtype=np.int64) for i in range(len(ds)))
    return out


def read_domains(prefix: str):
    import numpy as np

    from megatron_miniplm.data.meta import dataset_prefixes

    return np.concatenate([np.load(p + ".domains.npy") for p in dataset_prefixes(prefix)])


def dataset_files(directory) -> list[str]:
    return sorted(os.listdir(directory))
