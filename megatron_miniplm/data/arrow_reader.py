"""Streaming reader for Parquet files and `datasets` directories: texts in row order.

A Parquet file is read one row group at a time (pyarrow.parquet.ParquetFile, only the
columns the keys name); a directory written by `datasets`' `Dataset.save_to_disk` (its
state.json lists `_data_files`, each an Arrow IPC stream) one record batch at a time. A
row group is handed on as `RecordBlock`s of about `block_bytes` of text each (a row
group can hold hundreds of MB; the workers share it), so memory is bounded by one row
group or batch plus the blocks in flight, whatever the file size.

Keys name columns as they name JSON keys: 'text', or dotted ('meta.pile_set_name') for a
field of a struct column, where a column literally named with the dots wins over the
path. Every row that cannot be used becomes a `BadRecord` whose `line` is the 1-based
row number in the input (for a `datasets` directory, counted across its data files):
a missing column or struct field or a null parent struct (MISSING_KEY), a non-string
column or a null value (NOT_A_STRING), a string that is not valid UTF-8 (INVALID_UTF8),
empty text (EMPTY_TEXT). A file that cannot be read past some row is a `ReadFailure`
(CORRUPT_INPUT) at that row; the rows before it are kept, as with a damaged .gz/.zst.

FileDone carries the sha256 of the raw file (for a `datasets` directory: of its data
files, concatenated in state.json's order), its bytes on disk, the text bytes read (the
UTF-8 bytes of the text values) and the rows read.

Which inputs are Parquet files and which `datasets` directories is decided by
data/inputs.py, which calls read_parquet or read_datasets_dir accordingly. pyarrow is
imported on first use: JSONL-only runs never load it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from megatron_miniplm.data.blocks import FileDone, InputNotFoundError, ReadFailure, RecordBlock
from megatron_miniplm.data.records import DEFAULT_DOMAIN, BadRecord, SkipReason

DATASETS_STATE = "state.json"  # what makes a directory a `datasets` save_to_disk directory
HASH_READ = 1 << 20
ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end-of-stream marker a stream writer closes with
MAX_NAMES_SHOWN = 20


def datasets_files(path: str) -> list[str]:
    """The data files of a `datasets` save_to_disk directory, in order."""
    state_path = os.path.join(path, DATASETS_STATE)
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        files = [os.path.join(path, entry["filename"]) for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state_path}: not a datasets state file with _data_files ({e})") from None
    if not files:
        raise ValueError(f"{state_path}: lists no _data_files")
    for f in files:
        if not os.path.isfile(f):
            raise InputNotFoundError(f"{path}: {DATASETS_STATE} lists {os.path.basename(f)}, which is missing")
    return files


def _names(names) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_NAMES_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else "")


@dataclass(frozen=True)
class _Key:
    """A key resolved against a schema: the column, then struct fields, or why there is none."""

    dotted: str
    path: tuple[str, ...]
    missing: str | None = None  # MISSING_KEY detail for every row

    @property
    def projection(self) -> str:  # ParquetFile column selection: a name selects its nested leaves
        return ".".join(self.path)


def _resolve(schema, key: tuple[str, ...]) -> _Key:
    import pyarrow as pa

    dotted = ".".join(key)
    names = schema.names
    if len(key) > 1 and dotted in names:  # a literal dotted column wins over a path
        return _Key(dotted, (dotted,))
    if key[0] not in names:
        what = f"no column {key[0]!r}" + (f" for {dotted!r}" if len(key) > 1 else "")
        return _Key(dotted, (), f"{what} (columns: {_names(names)})")
    typ = schema.field(names.index(key[0])).type
    for depth, part in enumerate(key[1:], start=1):
        prefix = ".".join(key[:depth])
        if not pa.types.is_struct(typ):
            return _Key(dotted, (), f"no key {dotted!r}: column {prefix!r} is {typ}, not a struct")
        fields = [typ.field(i).name for i in range(typ.num_fields)]
        if part not in fields:
            return _Key(dotted, (),
                        f"no key {dotted!r}: struct {prefix!r} has no field {part!r} (fields: {_names(fields)})")
        typ = typ.field(fields.index(part)).type
    return _Key(dotted, key)


@dataclass
class _Leaf:
    """A key's values in one row group or batch."""

    key: _Key
    values: object = None  # a pyarrow string or large_string Array; None: see `problem`
    problem: tuple[SkipReason, str] | None = None  # applies to every row
    null_parents: list = field(default_factory=list)  # (prefix, bool mask): a parent struct is null there


def _leaf(table, key: _Key) -> _Leaf:
    import pyarrow as pa

    if key.missing is not None:
        return _Leaf(key, problem=(SkipReason.MISSING_KEY, key.missing))
    col = table.column(table.schema.names.index(key.path[0]))
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    leaf = _Leaf(key)
    for depth, part in enumerate(key.path[1:], start=1):
        if col.null_count:
            leaf.null_parents.append((".".join(key.path[:depth]), col.is_null().to_numpy(zero_copy_only=False)))
        col = col.field(part)  # the child of every row, null parents included: hence the masks
    typ = col.type
    if pa.types.is_dictionary(typ):
        col = col.dictionary_decode()
        typ = col.type
    if hasattr(pa.types, "is_string_view") and pa.types.is_string_view(typ):
        col = col.cast(pa.large_string())
        typ = col.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        leaf.values = col
    else:
        leaf.problem = (SkipReason.NOT_A_STRING, f"{key.dotted!r} is {typ}, not a string")
    return leaf


def _byte_lengths(leaf: _Leaf, n: int) -> np.ndarray:
    """UTF-8 bytes of each row's value (0 where there is none)."""
    if leaf.values is None:
        return np.zeros(n, np.int64)
    import pyarrow.compute as pc

    lengths = pc.binary_length(leaf.values).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    for _, mask in leaf.null_parents:
        lengths[mask] = 0
    return lengths


def _strings(leaf: _Leaf, lo: int, hi: int) -> tuple[list | None, dict[int, tuple[SkipReason, str]]]:
    """Rows lo..hi-1: their strings (None where there is none) and, by offset from lo,
    the first problem of each row that has one."""
    import pyarrow as pa

    dotted = leaf.key.dotted
    problems: dict[int, tuple[SkipReason, str]] = {}
    for prefix, mask in leaf.null_parents:
        for j in np.flatnonzero(mask[lo:hi]).tolist():
            problems.setdefault(j, (SkipReason.MISSING_KEY, f"no key {dotted!r}: {prefix!r} is null"))
    if leaf.values is None:
        for j in range(hi - lo):
            problems.setdefault(j, leaf.problem)
        return None, problems
    arr = leaf.values.slice(lo, hi - lo)
    try:
        values = arr.to_pylist()
    except UnicodeDecodeError:  # Parquet and Arrow readers do not validate UTF-8
        values = []
        binary = pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary()
        for j, raw in enumerate(arr.cast(binary).to_pylist()):
            try:
                values.append(raw if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                values.append(None)
                detail = f"{dotted!r}: invalid UTF-8 byte at byte {e.start + 1}"
                problems.setdefault(j, (SkipReason.INVALID_UTF8, detail))
    if arr.null_count:
        for j, v in enumerate(values):
            if v is None:
                problems.setdefault(j, (SkipReason.NOT_A_STRING, f"{dotted!r} is null"))
    return values, problems


def _cuts(lengths: np.ndarray, block_bytes: int) -> list[int]:
    """Ends of consecutive row ranges of about `block_bytes` each (at least one row)."""
    n = len(lengths)
    cum = np.cumsum(lengths)
    ends, done = [], 0
    start_bytes = 0
    while done < n:
        end = min(int(np.searchsorted(cum, start_bytes + block_bytes, side="left")) + 1, n)
        end = max(end, done + 1)
        ends.append(end)
        start_bytes, done = int(cum[end - 1]), end
    return ends


def _blocks(file_index: int, table, n: int, first_row: int, keys: tuple, block_bytes: int,
            raw_lo: int, raw_hi: int) -> Iterator[RecordBlock]:
    """The RecordBlocks of one row group or record batch of `n` rows."""
    text_key, domain_key = keys
    text = _leaf(table, text_key)
    domain = _leaf(table, domain_key) if domain_key is not None else None
    lengths = _byte_lengths(text, n)
    lo = 0
    for hi in _cuts(lengths, block_bytes):
        texts, text_problems = _strings(text, lo, hi)
        if domain is not None:
            domains, domain_problems = _strings(domain, lo, hi)
        else:
            domains, domain_problems = [DEFAULT_DOMAIN] * (hi - lo), {}
        bad: list[BadRecord] = []
        if text_problems or domain_problems or "" in texts:
            good_texts, good_domains = [], []
            for j in range(hi - lo):
                problem = text_problems.get(j) or domain_problems.get(j)
                if problem is None and not texts[j]:
                    problem = (SkipReason.EMPTY_TEXT, f"{text_key.dotted!r} is empty")
                if problem is None:
                    good_texts.append(texts[j])
                    good_domains.append(domains[j])
                else:
                    bad.append(BadRecord(first_row + lo + j, *problem))
            texts, domains = good_texts, good_domains
        yield RecordBlock(
            file_index=file_index,
            first_line=first_row + lo,
            texts=texts,
            domains=domains,
            bad=bad,
            num_lines=hi - lo,
            text_bytes=int(lengths[lo:hi].sum()),
            raw_pos=raw_lo + (raw_hi - raw_lo) * hi // n,
        )
        lo = hi


def _keys(schema, text_key: tuple[str, ...], domain_key: tuple[str, ...] | None) -> tuple:
    return _resolve(schema, text_key), (_resolve(schema, domain_key) if domain_key else None)


def _sha256(paths: list[str]) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_READ):
                sha.update(chunk)
                size += len(chunk)
    return sha.hexdigest(), size


def _read_errors():
    import pyarrow as pa

    return (OSError, pa.ArrowException)


def read_parquet(file_index: int, path: str, block_bytes: int, text_key: tuple[str, ...],
                 domain_key: tuple[str, ...] | None) -> Iterator[RecordBlock | ReadFailure | FileDone]:
    """RecordBlocks, row group after row group, then an optional ReadFailure, then FileDone."""
    import pyarrow.parquet as pq

    errors = _read_errors()
    rows = text_bytes = raw_pos = 0
    failure = None
    try:
        pf = pq.ParquetFile(path)
        schema, meta = pf.schema_arrow, pf.metadata
    except errors as e:
        pf, failure = None, f"cannot read Parquet: {e}"
    if pf is not None:
        try:
            keys = _keys(schema, text_key, domain_key)
            columns = sorted({k.projection for k in keys if k is not None and k.missing is None})
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                table = None
                if columns:  # else no row has what the keys name: nothing to read
                    try:
                        # One thread: arrow parallelizes over columns (one big one here), and the
                        # workers have the cores.
                        table = pf.read_row_group(g, columns=columns, use_threads=False)
                    except errors as e:
                        failure = f"cannot read row group {g}: {e}"
                        break
                # Progress: the row groups' compressed column chunks, all columns (the file's bulk).
                raw_end = raw_pos + sum(group.column(j).total_compressed_size for j in range(group.num_columns))
                for block in _blocks(file_index, table, group.num_rows, rows + 1, keys, block_bytes, raw_pos, raw_end):
                    text_bytes += block.text_bytes
                    yield block
                rows += group.num_rows
                raw_pos = raw_end
        finally:
            pf.close()
    if failure is not None:
        yield ReadFailure(file_index, BadRecord(rows + 1, SkipReason.CORRUPT_INPUT, failure))
    sha, size = _sha256([path])
    yield FileDone(file_index, path, sha, size, text_bytes, rows)


def _ends_with_eos(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < len(ARROW_EOS):
            return False
        f.seek(-len(ARROW_EOS), os.SEEK_END)
        return f.read() == ARROW_EOS


def read_datasets_dir(file_index: int, path: str, block_bytes: int, text_key: tuple[str, ...],
                      domain_key: tuple[str, ...] | None) -> Iterator[RecordBlock | ReadFailure | FileDone]:
    """RecordBlocks, record batch after record batch of each data file, then an optional
    ReadFailure, then FileDone."""
    import pyarrow as pa

    errors = _read_errors()
    files = datasets_files(path)
    rows = text_bytes = raw_done = 0
    failure = None
    for data_file in files:
        name = os.path.basename(data_file)
        with pa.memory_map(data_file) as source:
            try:
                reader = pa.ipc.open_stream(source)
                keys = _keys(reader.schema, text_key, domain_key)
            except errors as e:
                failure = f"{name}: cannot read the Arrow stream: {e}"
                break
            raw_pos = 0
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except errors as e:
                    failure = f"{name}: cannot read the Arrow stream: {e}"
                    break
                raw_end = source.tell()
                for block in _blocks(file_index, batch, batch.num_rows, rows + 1, keys, block_bytes,
                                     raw_done + raw_pos, raw_done + raw_end):
                    text_bytes += block.text_bytes
                    yield block
                rows += batch.num_rows
                raw_pos = raw_end
            if failure is not None:
                break
        if not _ends_with_eos(data_file):  # a stream cut at a batch boundary reads as a shorter one
            failure = f"{name}: the Arrow stream ends without its end-of-stream marker (truncated file)"
            break
        raw_done += os.path.getsize(data_file)
    if failure is not None:
        yield ReadFailure(file_index, BadRecord(rows + 1, SkipReason.CORRUPT_INPUT, failure))
    sha, size = _sha256(files)
    yield FileDone(file_index, path, sha, size, text_bytes, rows)
