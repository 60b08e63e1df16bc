"""--materialize: the selected instances written as a new indexed dataset.

For tools that read datasets rather than blends. Tokens are copied in blend order by the
C++ gather (chunked, so memory stays bounded), one document per instance as in the
preprocessed datasets; domain ids are renumbered into the union of the shards' domain
lists. Everything is written under temporary names and renamed at the end, the meta last.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from megatron_miniplm import _cpp
from megatron_miniplm.atomic_io import disk_space, publish, remove_quietly, temp_name
from megatron_miniplm.data.dataset_writer import DATA_SUFFIXES
from megatron_miniplm.data.indexed_dataset import DomainStats, IndexedDatasetWriter
from megatron_miniplm.data.meta import idx_fingerprint, write_json
from megatron_miniplm.selection.config import SelectionError
from megatron_miniplm.selection.shards import Shard, domain_table

CHUNK_ROWS = 1 << 20
# Per-dataset keys that must not be copied from a source shard's meta.
_OWN_KEYS = ("shards", "fingerprint", "num_instances", "num_tokens", "num_documents", "domains",
             "domain_stats", "inputs", "skipped", "kind")


def check_materializable(shards: list[Shard]) -> np.dtype:
    """The common token dtype; refuses shards that cannot be concatenated."""
    dtypes = {s.index.token_dtype for s in shards}
    if len(dtypes) != 1:
        raise SelectionError("--materialize: the shards store tokens as different dtypes "
                             f"({', '.join(sorted(str(d) for d in dtypes))})")
    return dtypes.pop()


@dataclass
class _Output:
    """The new dataset while it is written: every file under a temporary name."""

    prefix: str
    token_dtype: np.dtype
    num_rows: int
    tmp: dict = field(init=False)
    index: IndexedDatasetWriter = field(init=False)
    domains: np.ndarray = field(init=False)  # int32 [K], in the union numbering of domain_table
    stats: DomainStats = field(default_factory=DomainStats)

    def __post_init__(self) -> None:
        self.tmp = {ext: temp_name(self.prefix + ext) for ext in DATA_SUFFIXES + (".meta.json",)}
        self.domains = np.empty(self.num_rows, dtype=np.int32)
        self.index = IndexedDatasetWriter(self.tmp[".bin"], self.token_dtype)

    def finish(self) -> None:
        """The .idx and .domains.npy, still under temporary names."""
        self.index.finalize(self.tmp[".idx"])
        with disk_space(self.prefix + ".domains.npy", self.domains.nbytes), open(self.tmp[".domains.npy"], "wb") as f:
            np.save(f, self.domains)

    def publish(self, meta: dict) -> None:
        """The meta written under its temporary name, then the data files renamed into place,
        the meta last (an old meta removed first, so an interrupted publish never looks
        complete, and nothing is written once the first file is in place)."""
        meta_path = self.prefix + ".meta.json"
        write_json(self.tmp[".meta.json"], meta)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for ext in DATA_SUFFIXES + (".meta.json",):
            publish(self.tmp[ext], self.prefix + ext)

    def discard(self) -> None:
        """Whatever is still under a temporary name (everything, unless published)."""
        self.index.abort()
        for path in self.tmp.values():
            remove_quietly(path)


def _locate(chunk: np.ndarray, shards: list[Shard], maps: list[np.ndarray], shard_domains: list[np.ndarray]):
    """Where each (shard, instance) row's tokens are: shard, byte offset, length, global domain."""
    shard, row = np.ascontiguousarray(chunk[:, 0]), chunk[:, 1]
    offset = np.empty(len(chunk), dtype=np.int64)
    length = np.empty(len(chunk), dtype=np.int64)
    domain = np.empty(len(chunk), dtype=np.int64)
    for s in np.unique(shard):
        m = shard == s
        idx = row[m]
        offset[m] = shards[s].index.pointers[idx]
        length[m] = shards[s].index.lengths[idx]
        domain[m] = maps[s][np.asarray(shard_domains[s][idx])]
    return shard, offset, length, domain


def _copy_rows(rows: np.ndarray, shards: list[Shard], maps: list[np.ndarray], out: _Output,
               eod: int | None, num_threads: int) -> None:
    """The rows' tokens, in blend order, gathered a chunk at a time by the C++ gather."""
    sources = [s.data for s in shards]
    shard_domains = [s.domains() for s in shards]
    itemsize = out.token_dtype.itemsize
    for a in range(0, out.num_rows, CHUNK_ROWS):
        chunk = np.asarray(rows[a:a + CHUNK_ROWS])
        shard, offset, length, domain = _locate(chunk, shards, maps, shard_domains)
        nbytes = length * itemsize
        buf = np.empty(int(nbytes.sum()), dtype=np.uint8)
        _cpp.gather_bytes(sources, shard, offset, nbytes, buf, num_threads=num_threads)
        tokens = buf.view(out.token_dtype)
        out.index.add_sequences(tokens, length)
        out.domains[a:a + len(chunk)] = domain
        out.stats.add(tokens, length, domain, eod)


def _dataset_meta(out: _Output, shards: list[Shard], names: list[str], eod: int | None,
                  selection_meta: dict) -> dict:
    """The source meta's common keys, with this dataset's own counts and the selection."""
    meta = {key: v for key, v in shards[0].meta.items() if key not in _OWN_KEYS}
    meta.update({
        "fingerprint": idx_fingerprint(out.tmp[".idx"]),
        "num_instances": out.num_rows,
        "num_tokens": out.index.num_tokens,
        "num_documents": out.stats.num_documents if eod is not None else out.num_rows,
        "domains": names,
        "domain_stats": out.stats.to_meta(names),
        "inputs": [x for s in shards for x in (s.meta.get("inputs") or [])],
        "skipped": {},
        "selection": selection_meta,
    })
    return meta


def materialize(rows: np.ndarray, shards: list[Shard], prefix: str, selection_meta: dict,
                num_threads: int = 0) -> dict:
    """Writes PREFIX.bin/.idx/.domains.npy/.meta.json holding the blend's instances, in
    blend order; returns the dataset meta."""
    token_dtype = check_materializable(shards)
    names, maps = domain_table(shards)
    eod = (shards[0].meta.get("tokenizer") or {}).get("eod_id")
    out = _Output(prefix, token_dtype, int(rows.shape[0]))
    try:
        _copy_rows(rows, shards, maps, out, eod, num_threads)
        out.finish()
        meta = _dataset_meta(out, shards, names, eod, selection_meta)
        out.publish(meta)
        return meta
    finally:
        out.discard()
