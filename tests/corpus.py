"""Tiny instance datasets for tests: learnable token patterns, written like preprocess_data.py."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

EOD = 0


def pattern_instances(n: int, vocab: int, max_len: int, seed: int = 0) -> list:
    """Arithmetic progressions mod the vocabulary, each ending in EOD: easy to learn."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(max_len // 2, max_len))
        start, step = int(rng.integers(0, vocab - 1)), int(rng.choice([1, 2, 3]))
        body = (start + step * np.arange(length - 1)) % (vocab - 1) + 1
        out.append(np.append(body, EOD).astype(np.int64))
    return out


def write_dataset(prefix: str, instances: list, vocab: int, seq_length: int,
                  mode: str = "miniplm", domains=None, tokenizer: dict | None = None) -> str:
    """``tokenizer``: the meta's tokenizer record (default: a synthetic one of ``vocab`` tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16 if vocab < 65500 else np.int32)
    for inst in instances:
        builder.add_item(torch.from_numpy(np.asarray(inst)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    with open(prefix + ".idx", "rb") as f:
        fingerprint = hashlib.sha256(f.read()).hexdigest()
    domains = np.zeros(len(instances), dtype=np.int32) if domains is None else np.asarray(domains)
    np.save(prefix + ".domains.npy", domains)
    meta = {
        "format_version": 1, "fingerprint": fingerprint, "num_instances": len(instances),
        "num_tokens": int(sum(len(x) for x in instances)), "instance_mode": mode,
        "seq_length": seq_length, "domains": [f"d{i}" for i in range(int(domains.max()) + 1)],
        "tokenizer": tokenizer or {"path": "", "name": "synthetic", "sha256": "0" * 64, "vocab_size": vocab,
                                   "eod_id": EOD, "pad_id": EOD},
        "domain_stats": {}, "inputs": [], "skipped": {},
    }
    with open(prefix + ".meta.json", "w") as f:
        json.dump(meta, f)
    return prefix
