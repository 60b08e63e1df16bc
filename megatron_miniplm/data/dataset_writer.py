"""Writing datasets: megatron-core indexed datasets under temporary names, published
(fsync + rename, megatron_miniplm.atomic_io) on commit.

megatron-core's IndexedDatasetBuilder keeps the whole index (a Python int per sequence
and per document) in memory and builds the pointer list in a Python loop at finalize:
about 100 bytes and a microsecond per instance, i.e. gigabytes for a 100B-token corpus.
`StreamingIndexedDatasetBuilder` is that builder with its index lists spilled to disk in
fixed-size chunks and a chunked finalize; it writes the same bytes (tested against the
stock builder) and its inherited add_item / add_document / add_index still work.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, _IndexWriter

from megatron_miniplm.atomic_io import publish, temp_name
from megatron_miniplm.data.instances import Instances
from megatron_miniplm.data.meta import idx_fingerprint, meta_path, write_json

log = logging.getLogger(__name__)

SPILL_ENTRIES = 1 << 20  # index entries kept in memory before spilling to disk
DATA_SUFFIXES = (".bin", ".idx", ".domains.npy")


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype megatron-core picks for this vocabulary (uint16 below 65500)."""
    return DType.optimal_dtype(vocab_size)


class SpilledArray:
    """Append-only integer array: at most `capacity` entries in memory, the rest in a file.
    Quacks like the list megatron-core's builder appends to (append, extend, len)."""

    def __init__(self, path: str, dtype, capacity: int = SPILL_ENTRIES):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.capacity = capacity
        self._buf = np.empty(min(capacity, 4096), dtype=self.dtype)  # grows up to capacity
        self._used = 0
        self._spilled = 0
        self._file = None

    def __len__(self) -> int:
        return self._spilled + self._used

    def append(self, value) -> None:
        if self._used == len(self._buf):
            self._make_room()
        self._buf[self._used] = value
        self._used += 1

    def extend(self, values: Iterable) -> None:
        values = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=self.dtype).reshape(-1)
        while len(values):
            if self._used == len(self._buf):
                self._make_room()
            n = min(len(values), len(self._buf) - self._used)
            self._buf[self._used:self._used + n] = values[:n]
            self._used += n
            values = values[n:]

    def _make_room(self) -> None:
        if len(self._buf) < self.capacity:
            bigger = np.empty(min(self.capacity, 2 * len(self._buf)), dtype=self.dtype)
            bigger[: self._used] = self._buf[: self._used]
            self._buf = bigger
            return
        if self._file is None:
            self._file = open(self.path, "w+b")
        self._file.write(self._buf[: self._used].tobytes())
        self._spilled += self._used
        self._used = 0

    def chunks(self) -> Iterator[np.ndarray]:
        """All entries, in order, at most `capacity` at a time."""
        if self._file is not None:
            self._file.flush()
            self._file.seek(0)
            step = self.capacity * self.dtype.itemsize
            while data := self._file.read(step):
                yield np.frombuffer(data, dtype=self.dtype)
            self._file.seek(0, os.SEEK_END)
        yield self._buf[: self._used]

    def remove(self) -> None:
        """Delete the spill file and free the buffer: the array is done with."""
        if self._file is not None:
            self._file.close()
            self._file = None
            os.remove(self.path)
        self._buf = np.empty(0, dtype=self.dtype)
        self._used = self._spilled = 0


class StreamingIndexedDatasetBuilder(IndexedDatasetBuilder):
    """megatron-core's builder with a disk-spilled index and a chunked finalize."""

    def __init__(self, bin_path: str, dtype=np.int32, spill_entries: int = SPILL_ENTRIES):
        super().__init__(bin_path, dtype=dtype)
        self.sequence_lengths = SpilledArray(bin_path + ".lengths", np.int32, spill_entries)
        self.document_indices = SpilledArray(bin_path + ".docs", np.int64, spill_entries)
        self.document_indices.append(0)

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many sequences, one document each, in a single write."""
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        first = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths)
        self.document_indices.extend(np.arange(first + 1, first + len(lengths) + 1, dtype=np.int64))

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        itemsize = np.int64(DType.size(self.dtype))
        with _IndexWriter(idx_path, self.dtype) as writer:  # header, version, dtype code
            f = writer.idx_writer
            f.write(struct.pack("<Q", len(self.sequence_lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            for chunk in self.sequence_lengths.chunks():
                f.write(chunk.astype("<i4").tobytes())
            offset = np.int64(0)
            for chunk in self.sequence_lengths.chunks():
                sizes = chunk.astype(np.int64) * itemsize
                ends = np.cumsum(sizes) + offset
                f.write((ends - sizes).astype("<i8").tobytes())
                if len(ends):
                    offset = ends[-1]
            for chunk in self.document_indices.chunks():
                f.write(chunk.astype("<i8").tobytes())
        self.discard_index()

    def discard_index(self) -> None:
        self.sequence_lengths.remove()
        self.document_indices.remove()


def write_npy(path: str, array: SpilledArray) -> None:
    """A 1-D .npy file from a spilled array, streamed (np.load reads it as usual)."""
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": (len(array),)}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in array.chunks():
            f.write(chunk.tobytes())


@dataclass
class DomainStats:
    """documents = EOD tokens (every document ends with exactly one)."""

    documents: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    instances: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, batch: Instances, eod_id: int) -> None:
        if not len(batch):
            return
        n = int(batch.domains.max()) + 1
        if n > len(self.tokens):
            grow = lambda a: np.concatenate([a, np.zeros(n - len(a), np.int64)])  # noqa: E731
            self.documents, self.instances, self.tokens = map(grow, (self.documents, self.instances, self.tokens))
        starts = np.cumsum(batch.lengths) - batch.lengths
        eods = np.add.reduceat((batch.tokens == eod_id).astype(np.int64), starts) if len(batch.tokens) else 0
        self.documents += np.bincount(batch.domains, weights=eods, minlength=len(self.tokens)).astype(np.int64)
        self.instances += np.bincount(batch.domains, minlength=len(self.tokens))
        self.tokens += np.bincount(batch.domains, weights=batch.lengths, minlength=len(self.tokens)).astype(np.int64)

    def to_meta(self, domains: list[str]) -> dict:
        def at(a, i):
            return int(a[i]) if i < len(a) else 0

        return {
            name: {"documents": at(self.documents, i), "instances": at(self.instances, i), "tokens": at(self.tokens, i)}
            for i, name in enumerate(domains)
        }


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
        self.builder = StreamingIndexedDatasetBuilder(self.tmp[".bin"], dtype, spill_entries)
        self.domain_ids = SpilledArray(temp_name(prefix + ".domains"), np.int32, spill_entries)
        self.columns = {name: SpilledArray(temp_name(f"{prefix}.{name}"), dt, spill_entries) for name, dt in columns.items()}
        self.stats = DomainStats()
        self.num_instances = 0
        self.num_tokens = 0
        self.fingerprint: str | None = None
        self.finished = False

    def add(self, batch: Instances, columns: dict[str, np.ndarray]) -> None:
        self.builder.add_sequences(batch.tokens, batch.lengths)
        self.domain_ids.extend(batch.domains)
        for name, values in columns.items():
            self.columns[name].extend(values)
        self.stats.add(batch, self.eod_id)
        self.num_instances += len(batch)
        self.num_tokens += int(batch.lengths.sum())

    def finish(self) -> None:
        self.builder.finalize(self.tmp[".idx"])
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
            "num_documents": int(self.stats.documents.sum()),
            **{k: v for k, v in common.items() if k not in ("format_version",)},
            "domains": domains,
            "domain_stats": self.stats.to_meta(domains),
        }

    def paths(self) -> list[tuple[str, str]]:
        """(temporary, final) pairs; the meta file last."""
        return [(tmp, self.prefix + suffix) for suffix, tmp in self.tmp.items()]

    def abort(self) -> None:
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        self.builder.discard_index()
        self.domain_ids.remove()
        for column in self.columns.values():
            column.remove()
        for tmp, _ in self.paths():
            if os.path.exists(tmp):
                os.remove(tmp)


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
        self.dtype = token_dtype(vocab_size)
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
        import hashlib

        stats = DomainStats()
        for shard in self.shards:
            n = len(shard.stats.tokens)
            for name in ("documents", "instances", "tokens"):
                mine = getattr(stats, name)
                if len(mine) < n:
                    mine = np.concatenate([mine, np.zeros(n - len(mine), np.int64)])
                mine[:n] += getattr(shard.stats, name)
                setattr(stats, name, mine)
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
        if os.path.exists(self._top_meta_tmp):
            os.remove(self._top_meta_tmp)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
