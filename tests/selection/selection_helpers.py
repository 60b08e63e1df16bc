"""Small datasets built per the preprocessing contract (megatron IndexedDatasetBuilder +
PREFIX.meta.json + PREFIX.domains.npy), a word-level tokenizer, and score files."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
from megatron_miniplm.scoring.score_file import save_scores

VOCAB = 100  # words w0..w99, then the EOD token
EOD = VOCAB
DOMAINS = ["web", "code", "noise"]


def make_tokenizer(directory: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["<|endoftext|>"] = EOD
    vocab["[UNK]"] = EOD + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path


def build_dataset(prefix: str, sequences: list[np.ndarray], domains: np.ndarray, tokenizer: str,
                  domain_names=DOMAINS) -> dict:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for seq in sequences:
        builder.add_item(torch.from_numpy(seq.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    np.save(prefix + ".domains.npy", domains.astype(np.int32))
    with open(prefix + ".idx", "rb") as f:
        fp = hashlib.sha256(f.read()).hexdigest()
    with open(tokenizer, "rb") as f:
        tok_sha = hashlib.sha256(f.read()).hexdigest()
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    meta = {
        "format_version": 1, "fingerprint": fp, "num_instances": len(sequences), "num_tokens": int(lengths.sum()),
        "num_documents": len(sequences), "instance_mode": "miniplm", "seq_length": 48,
        "tokenizer": {"path": tokenizer, "name": "words", "sha256": tok_sha, "vocab_size": VOCAB + 2,
                      "eod_id": EOD, "pad_id": EOD},
        "domains": list(domain_names),
        "domain_stats": {n: {"documents": int((domains == i).sum()), "instances": int((domains == i).sum()),
                             "tokens": int(lengths[domains == i].sum())} for i, n in enumerate(domain_names)},
        "inputs": [], "skipped": {},
    }
    with open(prefix + ".meta.json", "w") as f:
        json.dump(meta, f)
    return meta


@dataclass
class Corpus:
    root: str
    prefixes: list[str]
    metas: list[dict]
    sequences: list[list[np.ndarray]]
    domains: list[np.ndarray]
    teacher: list[str]
    reference: list[str]
    teacher_arrays: list[np.ndarray]
    reference_arrays: list[np.ndarray]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(s) for s in self.sequences])])

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for s in self.sequences for x in s], dtype=np.int64)

    def all_scores(self, which: str) -> np.ndarray:
        return np.concatenate(self.teacher_arrays if which == "teacher" else self.reference_arrays)


def make_corpus(root: str, sizes=(700, 1, 900), seed: int = 0) -> Corpus:
    """Shards with domain-dependent scores drawn from few values (many exact ties)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    tokenizer = make_tokenizer(root)
    c = Corpus(root, [], [], [], [], [], [], [], [])
    for s, n in enumerate(sizes):
        prefix = os.path.join(root, f"corpus_{s:05d}")
        lengths = rng.integers(4, 49, n)
        seqs = [np.append(rng.integers(0, VOCAB, L - 1), EOD).astype(np.int64) for L in lengths]
        doms = rng.integers(0, len(DOMAINS), n)
        meta = build_dataset(prefix, seqs, doms, tokenizer)
        count = (lengths - 1).astype(np.float64)
        t_mean = rng.choice([1.0, 1.5, 2.0, 2.5], n) + 0.5 * (doms == 2)
        r_mean = t_mean + rng.choice([0.0, 0.5, 1.0], n) + 1.0 * (doms == 1)
        teacher = np.stack([t_mean * count, count], axis=1)
        reference = np.stack([r_mean * count, count], axis=1)
        for role, arr in (("teacher", teacher), ("reference", reference)):
            sp = os.path.join(root, f"{role}_{s:05d}")
            save_scores(sp, arr, {"dataset_fingerprint": meta["fingerprint"], "model": {"name": f"{role}-test"}})
            getattr(c, role).append(sp)
            getattr(c, f"{role}_arrays").append(arr)
        c.prefixes.append(prefix)
        c.metas.append(meta)
        c.sequences.append(seqs)
        c.domains.append(doms)
    return c


# numpy references (argsort-based), independent of the C++ selection


def ref_ranking(scores: np.ndarray, ascending: bool = False) -> np.ndarray:
    """Instance indices, best first: by score, ties by the lower index."""
    idx = np.arange(scores.size)
    return np.lexsort((idx, scores if ascending else -scores))


def ref_top_k(scores: np.ndarray, k: int, ascending: bool = False) -> np.ndarray:
    return np.sort(ref_ranking(scores, ascending)[:k])


def ref_budget(scores: np.ndarray, weights: np.ndarray, budget: int, ascending: bool = False) -> np.ndarray:
    order = ref_ranking(scores, ascending)
    cum = np.cumsum(weights[order].astype(np.int64))
    return np.sort(order[:np.searchsorted(cum, budget, side="right")])


def ref_difference(teacher: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return reference[:, 0] / reference[:, 1] - teacher[:, 0] / teacher[:, 1]


def to_pairs(global_idx: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    shard = np.searchsorted(offsets, global_idx, side="right") - 1
    return np.stack([shard, global_idx - offsets[shard]], axis=1).astype(np.int64)
