"""The D_ref split: a deterministic random slice of a dataset's instances, and the rest.

The random order is the order of a keyed hash: instance i gets key splitmix64(i + s(seed)),
a bijection of i, so keys are distinct. D_ref is the shortest prefix of that order that
holds the requested number of instances (--ref-fraction) or tokens (--ref-tokens); every
other instance goes to the rest. Both outputs keep the input order, carry the input's
domain ids, and record each instance's source index in PREFIX.source_index.npy.

Finding the threshold key needs no per-instance array in memory: a 65,536-bucket
histogram of the keys' top bits (weighted by count or tokens) finds the bucket where the
target is reached, and a second pass sorts only the keys inside that bucket.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from megatron_miniplm.data.dataset_writer import DatasetWriter
from megatron_miniplm.data.indexed_dataset import IndexedDatasetReader
from megatron_miniplm.data.instances import Instances
from megatron_miniplm.data.meta import dataset_prefixes, read_dataset_meta, verify_fingerprint
from megatron_miniplm.data.config import SplitConfig

log = logging.getLogger(__name__)

BUCKET_BITS = 16
PER_DATASET_KEYS = ("fingerprint", "num_instances", "num_tokens", "num_documents", "domains",
                    "domain_stats", "shards", "shard_fingerprints")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (Steele et al.); uint64 arithmetic wraps as intended."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def instance_keys(start: int, stop: int, seed: int) -> np.ndarray:
    offset = splitmix64(np.array([seed], dtype=np.uint64))[0]
    return splitmix64(np.arange(start, stop, dtype=np.uint64) + offset)


@dataclass
class _Source:
    """One shard of the input, memory-mapped."""

    first: int  # global index of its first instance
    data: IndexedDatasetReader
    domains: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.data.lengths


def _open_sources(prefix: str) -> list[_Source]:
    out, first = [], 0
    for p in dataset_prefixes(prefix):
        data = IndexedDatasetReader(p)
        domains = np.load(p + ".domains.npy", mmap_mode="r")
        if len(domains) != len(data):
            raise ValueError(f"{p}.domains.npy: {len(domains)} entries for {len(data)} instances")
        out.append(_Source(first, data, domains))
        first += len(data)
    return out


def _chunks(sources: list[_Source], size: int) -> Iterator[tuple[_Source, int, int]]:
    for src in sources:
        for lo in range(0, len(src.lengths), size):
            yield src, lo, min(lo + size, len(src.lengths))


def find_threshold(sources: list[_Source], seed: int, target: int, by_tokens: bool, chunk: int) -> int:
    """The key T such that instances with key <= T are the shortest key-order prefix
    holding `target` instances (or tokens)."""
    nb = 1 << BUCKET_BITS
    shift = np.uint64(64 - BUCKET_BITS)
    hist = np.zeros(nb, dtype=np.int64)
    for src, lo, hi in _chunks(sources, chunk):
        keys = instance_keys(src.first + lo, src.first + hi, seed)
        weights = src.lengths[lo:hi].astype(np.int64) if by_tokens else None
        hist += np.bincount((keys >> shift).astype(np.int64), weights=weights, minlength=nb).astype(np.int64)
    cum = np.cumsum(hist)
    bucket = int(np.searchsorted(cum, target, side="left"))  # first bucket with cum >= target
    before = int(cum[bucket - 1]) if bucket else 0
    keys_in, weights_in = [], []
    for src, lo, hi in _chunks(sources, chunk):
        keys = instance_keys(src.first + lo, src.first + hi, seed)
        hit = (keys >> shift).astype(np.int64) == bucket
        keys_in.append(keys[hit])
        weights_in.append(src.lengths[lo:hi][hit].astype(np.int64) if by_tokens else np.ones(int(hit.sum()), np.int64))
    keys_in, weights_in = np.concatenate(keys_in), np.concatenate(weights_in)
    order = np.argsort(keys_in)
    k = int(np.searchsorted(before + np.cumsum(weights_in[order]), target, side="left"))
    return int(keys_in[order][k])


@dataclass
class SplitSummary:
    ref_meta: dict
    rest_meta: dict
    seconds: float

    def format(self) -> str:
        total_i = self.ref_meta["num_instances"] + self.rest_meta["num_instances"]
        total_t = self.ref_meta["num_tokens"] + self.rest_meta["num_tokens"]
        rows = []
        for name, m in (("ref", self.ref_meta), ("rest", self.rest_meta)):
            rows.append(
                f"{name:>4}: {m['num_instances']:,} instances ({m['num_instances'] / total_i:.2%}), "
                f"{m['num_tokens']:,} tokens ({m['num_tokens'] / total_t:.2%}) -> {m['split']['prefix']}"
            )
        return "\n".join(rows + [f"split {total_i:,} instances in {self.seconds:.1f} s"])


def split_dataset(config: SplitConfig) -> SplitSummary:
    config.validate()
    start = time.perf_counter()
    meta = read_dataset_meta(config.input_prefix)
    verify_fingerprint(config.input_prefix)
    sources = _open_sources(config.input_prefix)
    total_instances = sum(len(s.lengths) for s in sources)
    total_tokens = int(sum(int(s.lengths.sum(dtype=np.int64)) for s in sources))
    target, by_tokens = _ref_target(config, total_instances, total_tokens)
    threshold = find_threshold(sources, config.seed, target, by_tokens, config.chunk_instances)
    tok = meta["tokenizer"]
    selection = _selection_record(config, meta, total_instances, total_tokens, threshold)
    cols = {"source_index": np.int64}
    ref = DatasetWriter(config.ref_prefix, tok["vocab_size"], tok["eod_id"], columns=cols)
    rest = DatasetWriter(config.rest_prefix, tok["vocab_size"], tok["eod_id"], columns=cols)
    try:
        _write_parts(sources, config, threshold, ref, rest)
        if rest.num_instances == 0:
            raise ValueError(f"{config.input_prefix}: the rest would be empty (the last instance is needed to reach the D_ref target)")
        common = {k: v for k, v in meta.items() if k not in PER_DATASET_KEYS}
        metas = [
            writer.prepare({**common, "split": {"part": part, "prefix": prefix, **selection}}, meta["domains"])
            for writer, part, prefix in ((ref, "ref", config.ref_prefix), (rest, "rest", config.rest_prefix))
        ]
        ref.publish()
        rest.publish()
    except BaseException:
        ref.abort()
        rest.abort()
        raise
    return SplitSummary(metas[0], metas[1], time.perf_counter() - start)


def _ref_target(config: SplitConfig, total_instances: int, total_tokens: int) -> tuple[int, bool]:
    """D_ref's size (instances, or tokens with --ref-tokens) and whether it counts tokens;
    refuses a split that would leave either part empty."""
    by_tokens = config.ref_tokens is not None
    if by_tokens:
        target, total = config.ref_tokens, total_tokens
    else:
        target, total = round(config.ref_fraction * total_instances), total_instances
    if target < 1:
        raise ValueError(f"{config.input_prefix}: D_ref would be empty ({total_instances} instances)")
    if target >= total:
        raise ValueError(
            f"{config.input_prefix}: the rest would be empty (D_ref target {target:,} of "
            f"{total:,} {'tokens' if by_tokens else 'instances'})"
        )
    return target, by_tokens


def _selection_record(config: SplitConfig, meta: dict, total_instances: int, total_tokens: int,
                      threshold: int) -> dict:
    """What both parts' metadata record of the split: the source, the settings, the key rule
    and its threshold (enough to recompute which part any source instance went to)."""
    return {
        "source_prefix": os.path.abspath(config.input_prefix),
        "source_fingerprint": meta["fingerprint"],
        "source_num_instances": total_instances,
        "source_num_tokens": total_tokens,
        "seed": config.seed,
        "ref_fraction": config.ref_fraction,
        "ref_tokens": config.ref_tokens,
        "key": "splitmix64(index + splitmix64(seed)); ref = key <= threshold",
        "threshold": f"{threshold:016x}",
    }


def _write_parts(sources: list[_Source], config: SplitConfig, threshold: int, ref: DatasetWriter,
                 rest: DatasetWriter) -> None:
    """Every instance, chunk by chunk in input order, to D_ref (key <= threshold) or the rest,
    with its domain and source index."""
    for src, lo, hi in _chunks(sources, config.chunk_instances):
        is_ref = instance_keys(src.first + lo, src.first + hi, config.seed) <= np.uint64(threshold)
        lengths = src.lengths[lo:hi].astype(np.int64)
        tokens = src.data.span(lo, hi)
        token_is_ref = np.repeat(is_ref, lengths)
        index = np.arange(src.first + lo, src.first + hi, dtype=np.int64)
        domains = np.asarray(src.domains[lo:hi], dtype=np.int32)
        for writer, sel, tsel in ((ref, is_ref, token_is_ref), (rest, ~is_ref, ~token_is_ref)):
            writer.add(Instances(tokens[tsel], lengths[sel], domains[sel]), {"source_index": index[sel]})
