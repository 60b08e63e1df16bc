"""The Megatron indexed-dataset format (PREFIX.bin + PREFIX.idx): the one module that
writes and reads it, and the per-domain statistics of what is written.

PREFIX.bin holds the tokens of every sequence, back to back, in the token dtype.
PREFIX.idx, all integers little-endian:

    9 bytes   INDEX_HEADER
    uint64    INDEX_VERSION
    uint8     token dtype code (DTYPE_CODES)
    uint64    N, the number of sequences
    uint64    D, the number of document indices
    int32[N]  tokens per sequence
    int64[N]  byte offset of each sequence in the .bin
    int64[D]  sequence index where each document starts, then N (so D = documents + 1)

These are the bytes megatron-core's IndexedDatasetBuilder writes and its IndexedDataset
reads (tests compare both ways, for several dtypes and for an empty dataset). Every other
module of megatron_miniplm reads and writes the files through this one, which needs numpy
alone: importing megatron-core costs seconds per process. The one place megatron-core's
own reader opens them is document-mode training: training/data.py (DocumentStream) hands
the prefixes to megatron-core's GPTDataset, which reads them with its IndexedDataset.
That is why the writer must keep megatron-core's bytes exactly.

    IndexedDatasetWriter   streams the .bin, spills the index to disk, writes the .idx
    IndexedDatasetReader   the .idx memory-mapped and checked, tokens read in place
    DomainStats            documents / instances / tokens per domain, as the meta records them
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Iterator

import numpy as np
from megatron_miniplm.atomic_io import close_quietly, disk_space, remove_quietly
from megatron_miniplm.errors import UserError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8
# megatron-core's token dtype codes (its DType enum).
DTYPE_CODES = {1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
               5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16)}
SMALL_VOCAB = 65500  # below this many token ids, tokens are stored as uint16 (megatron-core's rule)
SPILL_ENTRIES = 1 << 20  # index entries a writer keeps in memory before spilling to disk


class IndexedDatasetError(UserError, ValueError):
    """An .idx or .bin that cannot be read; the message names the file and the reason."""


def optimal_token_dtype(vocab_size: int | None) -> np.dtype:
    """The dtype megatron-core picks for this vocabulary: uint16 below SMALL_VOCAB, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < SMALL_VOCAB else np.int32)


def dtype_code(dtype) -> int:
    """The header's code for a token dtype; refuses a dtype the format cannot record."""
    dtype = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    raise ValueError(f"token dtype {dtype} has no code in the indexed-dataset format")


def pack_header(dtype, num_sequences: int, num_document_indices: int) -> bytes:
    return (INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", dtype_code(dtype))
            + struct.pack("<QQ", num_sequences, num_document_indices))


def unpack_header(head: bytes, path: str) -> tuple[np.dtype, int, int]:
    """(token dtype, N, D) from the first HEADER_SIZE bytes of the .idx at `path`."""
    if len(head) < HEADER_SIZE or head[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise IndexedDatasetError(f"{path}: not a megatron indexed-dataset index (bad header)")
    at = len(INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", head, at)
    code = head[at + 8]
    sequences, documents = struct.unpack_from("<QQ", head, at + 9)
    if version != INDEX_VERSION or code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{path}: unsupported index version {version} or dtype code {code}")
    return DTYPE_CODES[code], sequences, documents


class SpilledArray:
    """Append-only integer array: at most `capacity` entries in memory, the rest in a file,
    so an index of billions of entries costs a bounded amount of memory."""

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
        with disk_space(self.path):
            if self._file is None:
                self._file = open(self.path, "w+b")
            self._file.write(self._buf[: self._used].tobytes())
        self._spilled += self._used
        self._used = 0

    def chunks(self) -> Iterator[np.ndarray]:
        """All entries, in order, at most `capacity` at a time."""
        if self._file is not None:
            with disk_space(self.path):
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
            close_quietly(self._file)
            self._file = None
            remove_quietly(self.path)
        self._buf = np.empty(0, dtype=self.dtype)
        self._used = self._spilled = 0


class IndexedDatasetWriter:
    """Writes PREFIX.bin as sequences arrive and PREFIX.idx at `finalize`.

    The index (a length per sequence, a start per document) is kept in SpilledArrays and
    the .idx is written a chunk at a time, so memory stays bounded whatever the corpus
    size; megatron-core's builder keeps a Python int per entry instead, gigabytes for a
    large corpus. The caller names both files (temporary names, published later, are usual)."""

    def __init__(self, bin_path: str, dtype, spill_entries: int = SPILL_ENTRIES):
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # refuse an unrecordable dtype before writing anything
        self.bin_path = bin_path
        self.lengths = SpilledArray(bin_path + ".lengths", np.int32, spill_entries)
        self.document_indices = SpilledArray(bin_path + ".docs", np.int64, spill_entries)
        self.document_indices.append(0)
        self.num_sequences = 0  # the counts outlive the index arrays, dropped by finalize
        self.num_tokens = 0
        with disk_space(bin_path):
            self._bin = open(bin_path, "wb")

    def __len__(self) -> int:
        return self.num_sequences

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Sequences of one document each, their tokens concatenated."""
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self._write_tokens(tokens, lengths)
        first = len(self.lengths)
        self.lengths.extend(lengths)
        self.document_indices.extend(np.arange(first + 1, first + len(lengths) + 1, dtype=np.int64))

    def add_document(self, tokens: np.ndarray, lengths) -> None:
        """One document made of sequences of these lengths, their tokens concatenated."""
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self._write_tokens(tokens, lengths)
        self.lengths.extend(lengths)
        self.document_indices.append(len(self.lengths))

    def _write_tokens(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype).reshape(-1)
        if tokens.size != int(lengths.sum()):
            raise ValueError(f"{self.bin_path}: {tokens.size} tokens for sequences of {int(lengths.sum())} in all")
        with disk_space(self.bin_path):
            self._bin.write(tokens)
        self.num_sequences += len(lengths)
        self.num_tokens += tokens.size

    def finalize(self, idx_path: str) -> None:
        """Close the .bin, write the .idx, drop the spill files."""
        with disk_space(self.bin_path):
            self._bin.close()
        itemsize = np.int64(self.dtype.itemsize)
        size = HEADER_SIZE + 12 * len(self.lengths) + 8 * len(self.document_indices)
        with disk_space(idx_path, size), open(idx_path, "wb") as f:
            f.write(pack_header(self.dtype, len(self.lengths), len(self.document_indices)))
            for chunk in self.lengths.chunks():
                f.write(chunk.astype("<i4").tobytes())
            offset = np.int64(0)
            for chunk in self.lengths.chunks():
                sizes = chunk.astype(np.int64) * itemsize
                ends = np.cumsum(sizes) + offset
                f.write((ends - sizes).astype("<i8").tobytes())
                if len(ends):
                    offset = ends[-1]
            for chunk in self.document_indices.chunks():
                f.write(chunk.astype("<i8").tobytes())
        self._discard_index()

    def abort(self) -> None:
        """Close and delete the .bin and the spill files; the .idx is never started."""
        close_quietly(self._bin)
        self._discard_index()
        remove_quietly(self.bin_path)

    def _discard_index(self) -> None:
        self.lengths.remove()
        self.document_indices.remove()


class IndexedDatasetReader:
    """PREFIX.idx memory-mapped and checked against itself and PREFIX.bin; tokens are read
    in place from the memory-mapped .bin (read-only views, no copy)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        if not os.path.isfile(idx_path):
            raise FileNotFoundError(f"{idx_path}: index file not found")
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
        self.token_dtype, sequences, documents = unpack_header(head, idx_path)
        size = os.path.getsize(idx_path)
        need = HEADER_SIZE + 12 * sequences + 8 * documents
        if size < need:
            raise IndexedDatasetError(f"{idx_path}: truncated ({size} bytes, header promises {need})")
        mapped = memoryview(np.memmap(idx_path, dtype=np.uint8, mode="r"))
        self.lengths = np.frombuffer(mapped, np.int32, sequences, HEADER_SIZE)
        self.pointers = np.frombuffer(mapped, np.int64, sequences, HEADER_SIZE + 4 * sequences)
        self.document_indices = np.frombuffer(mapped, np.int64, documents, HEADER_SIZE + 12 * sequences)
        if not os.path.isfile(bin_path):
            raise FileNotFoundError(f"{bin_path}: data file not found")
        if sequences:
            end = int(self.pointers[-1]) + int(self.lengths[-1]) * self.token_dtype.itemsize
            if os.path.getsize(bin_path) < end:
                raise IndexedDatasetError(f"{bin_path}: {os.path.getsize(bin_path)} bytes, the index needs {end}")

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @cached_property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    @cached_property
    def data(self) -> np.ndarray:
        """The .bin bytes, memory-mapped (uint8)."""
        path = self.prefix + ".bin"
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(path, dtype=np.uint8, mode="r")

    def __getitem__(self, i: int) -> np.ndarray:
        """Token ids of sequence i."""
        return np.frombuffer(self.data, dtype=self.token_dtype, count=int(self.lengths[i]),
                             offset=int(self.pointers[i]))

    def span(self, lo: int, hi: int) -> np.ndarray:
        """Token ids of sequences lo .. hi - 1, concatenated (they are adjacent in the .bin)."""
        if lo >= hi:
            return np.zeros(0, dtype=self.token_dtype)
        return np.frombuffer(self.data, dtype=self.token_dtype, offset=int(self.pointers[lo]),
                             count=int(self.lengths[lo:hi].sum(dtype=np.int64)))


@dataclass
class DomainStats:
    """Per-domain totals, indexed by domain id: instances, tokens, and documents (EOD
    tokens: every document ends with exactly one)."""

    documents: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    instances: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def _grow(self, n: int) -> None:
        if n > len(self.tokens):
            grow = lambda a: np.concatenate([a, np.zeros(n - len(a), np.int64)])  # noqa: E731
            self.documents, self.instances, self.tokens = map(grow, (self.documents, self.instances, self.tokens))

    def add(self, tokens: np.ndarray, lengths: np.ndarray, domains: np.ndarray, eod_id: int | None) -> None:
        """Instances given as concatenated tokens, a length and a domain id each. Without
        an EOD id documents are not counted."""
        if not len(lengths):
            return
        domains = np.asarray(domains, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        self._grow(int(domains.max()) + 1)
        n = len(self.tokens)
        self.instances += np.bincount(domains, minlength=n)
        self.tokens += np.bincount(domains, weights=lengths, minlength=n).astype(np.int64)
        if eod_id is not None:
            eods_before = np.concatenate([[0], np.cumsum(np.asarray(tokens) == eod_id, dtype=np.int64)])
            ends = np.cumsum(lengths)
            eods = eods_before[ends] - eods_before[ends - lengths]
            self.documents += np.bincount(domains, weights=eods, minlength=n).astype(np.int64)

    def merge(self, other: "DomainStats") -> None:
        """Add another dataset's totals (a shard's, into the whole dataset's)."""
        self._grow(len(other.tokens))
        for name in ("documents", "instances", "tokens"):
            getattr(self, name)[:len(other.tokens)] += getattr(other, name)

    @property
    def num_documents(self) -> int:
        return int(self.documents.sum())

    def to_meta(self, domains: list[str]) -> dict:
        """The meta's "domain_stats": {name: {documents, instances, tokens}}, zeros for
        domains that hold no instance."""
        def at(a, i):
            return int(a[i]) if i < len(a) else 0

        return {
            name: {"documents": at(self.documents, i), "instances": at(self.instances, i), "tokens": at(self.tokens, i)}
            for i, name in enumerate(domains)
        }
