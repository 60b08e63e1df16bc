"""Dataset shards as Difference Sampling sees them: meta, instance lengths, domains.

A dataset prefix is PREFIX.bin / PREFIX.idx (megatron-core indexed dataset, one sequence
per instance), PREFIX.domains.npy and PREFIX.meta.json; a sharded dataset's top-level
meta lists its shards ("shards": relative prefixes). The .idx is read here directly
(memory-mapped, a few header fields) rather than through megatron-core, whose import
alone costs seconds per process; tests check both readers agree.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron-core's token dtype codes in the .idx header.
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                7: np.float32, 8: np.uint16}


class DatasetError(ValueError):
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


@dataclass
class IndexArrays:
    """The .idx contents, memory-mapped."""

    token_dtype: np.dtype
    lengths: np.ndarray  # int32 [N], tokens per instance
    pointers: np.ndarray  # int64 [N], byte offset of each instance in the .bin
    document_indices: np.ndarray  # int64 [D + 1]


def _mapped(path: str, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def read_index(prefix: str) -> IndexArrays:
    path = prefix + ".idx"
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: index file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise DatasetError(f"{path}: not a megatron indexed-dataset index (bad header)")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    seqs, docs = struct.unpack("<QQ", head[18:34])
    if version != INDEX_VERSION or code not in TOKEN_DTYPES:
        raise DatasetError(f"{path}: unsupported index version {version} or dtype code {code}")
    need = 34 + 4 * seqs + 8 * seqs + 8 * docs
    if size < need:
        raise DatasetError(f"{path}: truncated ({size} bytes, header promises {need})")
    return IndexArrays(
        token_dtype=np.dtype(TOKEN_DTYPES[code]),
        lengths=_mapped(path, np.int32, 34, seqs),
        pointers=_mapped(path, np.int64, 34 + 4 * seqs, seqs),
        document_indices=_mapped(path, np.int64, 34 + 12 * seqs, docs),
    )


@dataclass
class Shard:
    prefix: str
    meta: dict
    index: IndexArrays = field(repr=False)

    @property
    def num_instances(self) -> int:
        return int(self.index.lengths.shape[0])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @cached_property
    def num_tokens(self) -> int:
        return int(self.index.lengths.sum(dtype=np.int64))

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

    @cached_property
    def data(self) -> np.ndarray:
        """The .bin bytes, memory-mapped (uint8)."""
        path = self.prefix + ".bin"
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(path, dtype=np.uint8, mode="r")

    def tokens(self, i: int) -> np.ndarray:
        """Token ids of instance i (a read-only view)."""
        start = int(self.index.pointers[i])
        n = int(self.index.lengths[i])
        return np.frombuffer(self.data, dtype=self.index.token_dtype, count=n, offset=start)

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
    index = read_index(prefix)
    n = int(index.lengths.shape[0])
    if meta["num_instances"] != n:
        raise DatasetError(f"{prefix}.idx: {n} instances, but {prefix}.meta.json says num_instances={meta['num_instances']}")
    bin_path = prefix + ".bin"
    if not os.path.isfile(bin_path):
        raise DatasetError(f"{bin_path}: data file not found")
    if n:
        end = int(index.pointers[-1]) + int(index.lengths[-1]) * index.token_dtype.itemsize
        if os.path.getsize(bin_path) < end:
            raise DatasetError(f"{bin_path}: {os.path.getsize(bin_path)} bytes, the index needs {end}")
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
