"""Tiny datasets and checkpoints for the scoring tests (no tokenizer, no preprocessing run)."""

from __future__ import annotations

import json
import os

import numpy as np

EOD = 0
VOCAB = 500  # padded to 512 by the model: the last 12 rows are megatron padding
TOKENIZER = {"path": "tok.json", "name": "test", "sha256": "a" * 64, "vocab_size": VOCAB,
             "eod_id": EOD, "pad_id": EOD}


def make_instances(n: int, seed: int = 0, max_len: int = 65) -> list[np.ndarray]:
    """Instances of varied lengths (1 .. max_len tokens) with EODs inside, like MiniPLM's."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = 1 if i == 3 else int(rng.integers(2, max_len + 1))
        x = rng.integers(1, VOCAB, size=length)
        for pos in rng.integers(0, length, size=length // 16):
            x[pos] = EOD
        out.append(x.astype(np.int64))
    return out


def write_dataset(prefix: str, instances: list[np.ndarray], tokenizer: dict = TOKENIZER) -> dict:
    """PREFIX.bin/.idx + a PREFIX.meta.json with every key of the preprocessing contract."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_miniplm.data.meta import idx_fingerprint

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for x in instances:
        builder.add_item(torch.from_numpy(x.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    meta = {
        "format_version": 1, "fingerprint": idx_fingerprint(prefix + ".idx"),
        "num_instances": len(instances), "num_tokens": int(sum(len(x) for x in instances)),
        "instance_mode": "miniplm", "seq_length": max(len(x) for x in instances) - 1,
        "tokenizer": dict(tokenizer), "domains": ["default"], "domain_stats": {}, "inputs": [],
        "skipped": {},
    }
    with open(prefix + ".meta.json", "w") as f:
        json.dump(meta, f)
    return meta


def write_sharded(prefix: str, parts: list[list[np.ndarray]]) -> dict:
    """A sharded dataset: PREFIX_0000i shards and a top-level meta listing them."""
    metas = [write_dataset(f"{prefix}_{i:05d}", part) for i, part in enumerate(parts)]
    top = {**metas[0], "num_instances": sum(m["num_instances"] for m in metas),
           "fingerprint": "top-" + "".join(m["fingerprint"][:8] for m in metas),
           "shards": [os.path.basename(f"{prefix}_{i:05d}") for i in range(len(parts))]}
    with open(prefix + ".meta.json", "w") as f:
        json.dump(top, f)
    return top


def save_checkpoint(directory: str, preset: str = "tiny", vocab: int = VOCAB, tokenizer: dict | None = TOKENIZER,
                    seed: int = 3) -> None:
    """A random model at TP=1/PP=1 (run under run_distributed, world 1), with its config
    and, unless ``tokenizer`` is None, a checkpoint_info.json naming the tokenizer."""
    from megatron_miniplm import parallel
    from megatron_miniplm.dist_checkpoint import save_model
    from presets import get_preset
    from megatron_miniplm.models.gpt import build_model

    parallel.initialize(parallel.ParallelConfig(seed=seed))
    config = get_preset(preset).replace(vocab_size=vocab)
    model = build_model(config)
    os.makedirs(directory)
    save_model([model], directory, config)
    if tokenizer is not None:
        with open(os.path.join(directory, "checkpoint_info.json"), "w") as f:
            json.dump({"format_version": 1, "tokenizer": dict(tokenizer)}, f)
