"""Writing datasets: indexed datasets (megatron_miniplm.data.indexed_dataset) under
temporary names, with a domain id per instance, optional per-instance columns and the
meta, published (fsync + rename, megatron_miniplm.atomic_io) on commit.

The index is spilled to disk as it grows (IndexedDatasetWriter), and so are the domain
ids and columns, so memory stays bounded whatever the corpus size.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from megatron_miniplm.atomic_io import disk_space, publish, remove_quietly, temp_name
from megatron_miniplm.data.indexed_dataset import (
    SPILL_ENTRIES, DomainStats, IndexedDatasetWriter, SpilledArray, optimal_token_dtype,
)
from megatron_miniplm.data.instances import Instances
from megatron_miniplm.data.meta import idx_fingerprint, meta_path, write_json

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".bin", ".idx", ".domains.npy")


def write_npy(path: str, array: SpilledArray) -> None:
    """A 1-D .npy file from a spilled array, streamed (np.load reads it as usual)."""
    with disk_space(path, len(array) * array.dtype.itemsize), open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": (len(array),)}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in array.chunks():
            f.write(chunk.tobytes())


def dataset_suffixes(columns) -> tuple[str, ...]:
    """The files of one dataset, by suffix: the data files, one .NAME.npy per extra
    column, and the meta file last."""
    return DATA_SUFFIXES + tuple(f".{name}.npy" for name in columns) + (".meta.json",)


class _Shard:
    """One dataset on disk (PREFIX.bin/.idx/.domains.npy/.meta.json, plus one
    PREFIX.NAME.npy per extra per-instance column), under temporary names."""

    def __init__(self, prefix: str, dtype, eod_id: int, spill_entries: int, columns: dict[str, type]):
        self.prefix = prefix
        self.eod_id = eod_id
        self.tmp = {suffix: temp_name(prefix + suffix) for suffix in dataset_suffixes(columns)}
        self.index = IndexedDatasetWriter(self.tmp[".bin"], dtype, spill_entries)
        self.domain_ids = SpilledArray(temp_name(prefix + ".domains"), np.int32, spill_entries)
        self.columns = {name: SpilledArray(temp_name(f"{prefix}.{name}"), dt, spill_entries) for name, dt in columns.items()}
        self.stats = DomainStats()
        self.fingerprint: str | None = None
        self.finished = False

    @property
    def num_instances(self) -> int:
        return len(self.index)

    @property
    def num_tokens(self) -> int:
        return self.index.num_tokens

    def add(self, batch: Instances, columns: dict[str, np.ndarray]) -> None:
        self.index.add_sequences(batch.tokens, batch.lengths)
        self.domain_ids.extend(batch.domains)
        for name, values in columns.items():
            self.columns[name].extend(values)
        self.stats.add(batch.tokens, batch.lengths, batch.domains, self.eod_id)

    def finish(self) -> None:
        self.index.finalize(self.tmp[".idx"])
        write_npy(self.tmp[".domains.npy"], self.domain_ids)
        self.domain_ids.remove()
        for name, column in self.columns.items():
            write_npy(self.tmp[f".{name}.npy"], column)
            column.remove()
        self.fingerprint = idx_fingerprint(self.tmp[".idx"])
        self.finished = True

    def meta(self, common: dict, domains: list[str]) -> dict:
        return {
            "format_version": common["format_version"],
            "fingerprint": self.fingerprint,
            "num_instances": self.num_instances,
            "num_tokens": self.num_tokens,
            "num_documents": self.stats.num_documents,
            **{k: v for k, v in common.items() if k not in ("format_version",)},
            "domains": domains,
            "domain_stats": self.stats.to_meta(domains),
        }

    def paths(self) -> list[tuple[str, str]]:
        """(temporary, final) pairs; the meta file last."""
        return [(tmp, self.prefix + suffix) for suffix, tmp in self.tmp.items()]

    def abort(self) -> None:
        self.index.abort()
        self.domain_ids.remove()
        for column in self.columns.values():
            column.remove()
        for tmp, _ in self.paths():
            remove_quietly(tmp)


def shard_prefix(prefix: str, index: int) -> str:
    return f"{prefix}_{index:05d}"


class DatasetWriter:
    """Instances in, a complete dataset out, or nothing: every file is written under a
    temporary name and renamed by `commit`, the meta.json last. With `shard_size_tokens`
    the output is PREFIX_00000, PREFIX_00001, ... (at most that many tokens each, unless a
    single instance is longer) plus a top-level PREFIX.meta.json listing them. `columns`
    names extra per-instance arrays (written as PREFIX.NAME.npy) passed to `add`."""

    def __init__(self, prefix: str, vocab_size: int, eod_id: int, shard_size_tokens: int | None = None,
                 spill_entries: int = SPILL_ENTRIES, columns: dict[str, type] | None = None):
        if shard_size_tokens is not None and shard_size_tokens < 1:
            raise ValueError(f"shard_size_tokens must be >= 1, got {shard_size_tokens}")
        out_dir = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"{prefix}: output directory {out_dir} does not exist")
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.dtype = optimal_token_dtype(vocab_size)
        self.eod_id = eod_id
        self.shard_size = shard_size_tokens
        self.spill_entries = spill_entries
        self.columns = dict(columns or {})
        self.shards: list[_Shard] = []
        self._top_meta_tmp = temp_name(meta_path(prefix))  # sharded: the top-level meta
        self._prepared = False
        self._open_shard()

    @property
    def sharded(self) -> bool:
        return self.shard_size is not None

    def _open_shard(self) -> None:
        prefix = shard_prefix(self.prefix, len(self.shards)) if self.sharded else self.prefix
        self.shards.append(_Shard(prefix, self.dtype, self.eod_id, self.spill_entries, self.columns))

    def add(self, batch: Instances, columns: dict[str, np.ndarray] | None = None) -> None:
        columns = columns or {}
        if set(columns) != set(self.columns):
            raise ValueError(f"expected columns {sorted(self.columns)}, got {sorted(columns)}")
        if not len(batch):
            return
        top = int(batch.tokens.max()) if len(batch.tokens) else 0
        if top >= self.vocab_size or (len(batch.tokens) and int(batch.tokens.min()) < 0):
            raise ValueError(f"token id {top} outside the vocabulary (size {self.vocab_size})")
        if not self.sharded:
            self.shards[-1].add(batch, columns)
            return
        ends = np.cumsum(batch.lengths)
        start = 0  # instance index
        while start < len(batch):
            shard = self.shards[-1]
            room = self.shard_size - shard.num_tokens
            base = ends[start - 1] if start else 0
            stop = int(np.searchsorted(ends, base + room, side="right"))
            if stop == start:
                if shard.num_instances:  # full: the next instance opens a new shard
                    shard.finish()
                    self._open_shard()
                    continue
                stop = start + 1  # an instance longer than a shard gets a shard of its own
            lo, hi = int(base), int(ends[stop - 1])
            shard.add(Instances(batch.tokens[lo:hi], batch.lengths[start:stop], batch.domains[start:stop]),
                      {name: values[start:stop] for name, values in columns.items()})
            start = stop

    @property
    def num_instances(self) -> int:
        return sum(shard.num_instances for shard in self.shards)

    def commit(self, common_meta: dict, domains: list[str]) -> dict:
        """prepare() then publish(): returns the top-level meta."""
        meta = self.prepare(common_meta, domains)
        self.publish()
        return meta

    def prepare(self, common_meta: dict, domains: list[str]) -> dict:
        """Finish every shard and write the metas, all still under temporary names."""
        for shard in self.shards:
            if not shard.finished:
                shard.finish()
        metas = [shard.meta(common_meta, domains) for shard in self.shards]
        for shard, meta in zip(self.shards, metas):
            write_json(shard.tmp[".meta.json"], meta)
        top = metas[0]
        if self.sharded:
            top = self._top_meta(common_meta, domains, metas)
            write_json(self._top_meta_tmp, top)
        self._prepared = True
        return top

    def publish(self) -> None:
        """fsync and rename everything into place, each meta.json after its data files."""
        if not self._prepared:
            raise RuntimeError("publish() before prepare()")
        self._remove_stale_outputs()
        for shard in self.shards:
            for tmp, final in shard.paths():
                publish(tmp, final)
        if self.sharded:
            publish(self._top_meta_tmp, meta_path(self.prefix))

    def _top_meta(self, common: dict, domains: list[str], metas: list[dict]) -> dict:
        stats = DomainStats()
        for shard in self.shards:
            stats.merge(shard.stats)
        return {
            "format_version": common["format_version"],
            # sha256 over the shards' .idx fingerprints, in order.
            "fingerprint": hashlib.sha256("\n".join(m["fingerprint"] for m in metas).encode()).hexdigest(),
            "num_instances": sum(m["num_instances"] for m in metas),
            "num_tokens": sum(m["num_tokens"] for m in metas),
            "num_documents": sum(m["num_documents"] for m in metas),
            **{k: v for k, v in common.items() if k != "format_version"},
            "domains": domains,
            "domain_stats": stats.to_meta(domains),
            "shards": [os.path.basename(s.prefix) for s in self.shards],
            "shard_fingerprints": [m["fingerprint"] for m in metas],
        }

    def _remove_stale_outputs(self) -> None:
        """A previous dataset at this prefix is replaced entirely: its meta first (so an
        interrupted commit never looks complete), then files the new one does not
        overwrite (the unsharded files, or shards beyond the new count)."""
        stale = [meta_path(self.prefix)]
        if self.sharded:
            stale += [self.prefix + s for s in dataset_suffixes(self.columns)[:-1]]
            i = len(self.shards)
        else:
            i = 0
        while os.path.exists(meta_path(shard_prefix(self.prefix, i))) or os.path.exists(shard_prefix(self.prefix, i) + ".bin"):
            stale += [shard_prefix(self.prefix, i) + s for s in dataset_suffixes(self.columns)]
            i += 1
        for path in stale:
            if os.path.exists(path):
                log.info("removing %s (replaced by the new dataset)", path)
                os.remove(path)

    def abort(self) -> None:
        """Remove every temporary file; the final names are untouched."""
        for shard in self.shards:
            shard.abort()
        remove_quietly(self._top_meta_tmp)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
