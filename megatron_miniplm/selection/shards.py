"""Dataset shards as Difference Sampling sees them: meta, instance lengths, domains.

A dataset prefix is PREFIX.bin / PREFIX.idx (an indexed dataset, one sequence per
instance, read through megatron_miniplm.data.indexed_dataset without megatron-core),
PREFIX.domains.npy and PREFIX.meta.json; a sharded dataset's top-level meta lists its
shards ("shards": relative prefixes).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_miniplm.data.indexed_dataset import IndexedDatasetError, IndexedDatasetReader
from megatron_miniplm.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used; the message names the file and the reason."""


def read_dataset_meta(prefix: str) -> dict[str, Any]:
    """PREFIX.meta.json under the preprocessing contract, refusing a blend given as a dataset."""
    from megatron_miniplm.data import meta as data_meta

    try:
        meta = data_meta.read_dataset_meta(prefix)
    except (FileNotFoundError, data_meta.DatasetMetaError) as e:
        kind = _peek_kind(prefix)
        if kind == "miniplm_sampled_blend":
            raise DatasetError(f"{prefix}.meta.json: {prefix!r} is a sampled blend, not a dataset; "
                               "select from the dataset itself") from None
        raise DatasetError(str(e)) from None
    return meta


def _peek_kind(prefix: str):
    try:
        with open(prefix + ".meta.json", encoding="utf-8") as f:
            return json.load(f).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def expand_prefixes(prefixes: list[str]) -> list[str]:
    """Shard prefixes in order: a sharded dataset's top-level prefix becomes its shards."""
    from megatron_miniplm.data.meta import dataset_prefixes

    out: list[str] = []
    for prefix in prefixes:
        read_dataset_meta(prefix)  # clear errors first
        out.extend(dataset_prefixes(prefix))
    return out


def open_indexed(prefix: str) -> IndexedDatasetReader:
    """The shard's .idx/.bin, memory-mapped; a missing or damaged file is a DatasetError."""
    try:
        return IndexedDatasetReader(prefix)
    except (FileNotFoundError, IndexedDatasetError) as e:
        raise DatasetError(str(e)) from None


@dataclass
class Shard:
    prefix: str
    meta: dict
    index: IndexedDatasetReader = field(repr=False)

    @property
    def num_instances(self) -> int:
        return len(self.index)

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def num_tokens(self) -> int:
        return self.index.num_tokens

    @property
    def domain_names(self) -> list[str]:
        names = self.meta.get("domains") or []
        return [str(n) for n in names]

    def domains(self) -> np.ndarray:
        """Domain id per instance (PREFIX.domains.npy), memory-mapped."""
        path = self.prefix + ".domains.npy"
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: domain file not found")
        arr = np.load(path, mmap_mode="r" if self.num_instances else None, allow_pickle=False)
        if arr.ndim != 1 or arr.shape[0] != self.num_instances or not np.issubdtype(arr.dtype, np.integer):
            raise DatasetError(f"{path}: expected {self.num_instances} integer domain ids, got {arr.dtype} {arr.shape}")
        return arr

    @property
    def data(self) -> np.ndarray:
        """The .bin bytes, memory-mapped (uint8)."""
        return self.index.data

    def tokens(self, i: int) -> np.ndarray:
        """Token ids of instance i (a read-only view)."""
        return self.index[i]

    def mapped_domains(self, to_global: np.ndarray) -> np.ndarray:
        """Domain ids of every instance in the global numbering of `domain_table`."""
        local = np.asarray(self.domains())
        if local.size and (local.min() < 0 or local.max() >= len(to_global)):
            raise DatasetError(f"{self.prefix}.domains.npy: domain id outside the {len(to_global)} domains "
                               f"listed in {self.prefix}.meta.json")
        return to_global[local]


def open_shard(prefix: str) -> Shard:
    meta = read_dataset_meta(prefix)
    if meta.get("shards"):
        raise DatasetError(f"{prefix}.meta.json: a sharded dataset's top level; open its shards (expand_prefixes)")
    index = open_indexed(prefix)
    if meta["num_instances"] != len(index):
        raise DatasetError(f"{prefix}.idx: {len(index)} instances, but {prefix}.meta.json says "
                           f"num_instances={meta['num_instances']}")
    return Shard(prefix=prefix, meta=meta, index=index)


def open_shards(prefixes: list[str]) -> list[Shard]:
    """Every shard of every dataset prefix given, in order."""
    return [open_shard(p) for p in expand_prefixes(prefixes)]


def shard_offsets(shards: list[Shard]) -> np.ndarray:
    """int64 [S + 1]: global index of each shard's first instance, then the total."""
    return np.concatenate([[0], np.cumsum([s.num_instances for s in shards], dtype=np.int64)]).astype(np.int64)


def concat_lengths(shards: list[Shard]) -> np.ndarray:
    """Tokens per instance over all shards (int32 [N]): the budget mode's weights."""
    out = np.empty(sum(s.num_instances for s in shards), dtype=np.int32)
    at = 0
    for s in shards:
        out[at:at + s.num_instances] = s.index.lengths
        at += s.num_instances
    return out


def domain_table(shards: list[Shard]) -> tuple[list[str], list[np.ndarray]]:
    """Domain names over all shards (first-seen order) and, per shard, a map from its
    local domain ids to those global ids. Shards may list domains differently."""
    names: list[str] = []
    maps: list[np.ndarray] = []
    for s in shards:
        local = s.domain_names
        ids = []
        for name in local:
            if name not in names:
                names.append(name)
            ids.append(names.index(name))
        maps.append(np.asarray(ids, dtype=np.int32))
    return names, maps
