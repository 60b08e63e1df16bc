"""Streaming reader: plain, gzip and zstd; blocks, line numbers, hashes, damaged streams."""
import gzip
import hashlib
import os

import pytest

from megatron_miniplm.data.blocks import Block, FileDone, InputNotFoundError, ReadFailure
from megatron_miniplm.data.inputs import compression_of, read_blocks, resolve_inputs
from megatron_miniplm.data.jsonl_reader import read_file
from megatron_miniplm.data.records import SkipReason

from .conftest import make_records, write_jsonl


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


@pytest.fixture(scope="module")
def payload() -> bytes:
    import json

    return b"\n".join(json.dumps(r).encode() for r in make_records(200, seed=5)) + b"\n"


def collect(path, block_bytes):
    items = list(read_file(0, path, block_bytes, compression=compression_of(path)))
    blocks = [i for i in items if isinstance(i, Block)]
    fails = [i for i in items if isinstance(i, ReadFailure)]
    assert isinstance(items[-1], FileDone)
    return blocks, fails, items[-1]


@pytest.mark.parametrize("how,ext", [("none", ".jsonl"), ("gzip", ".jsonl.gz"), ("zstd", ".jsonl.zst")])
def test_blocks_reassemble_the_file(tmp_path, payload, how, ext):
    path = tmp_path / f"x{ext}"
    raw = compress(payload, how)
    path.write_bytes(raw)
    blocks, fails, done = collect(str(path), block_bytes=4096)
    assert not fails and len(blocks) > 5
    assert b"".join(b.data for b in blocks) == payload
    assert all(b.data.endswith(b"\n") for b in blocks)
    line = 1
    for b in blocks:  # line numbers are contiguous
        assert b.first_line == line and b.num_lines == b.data.count(b"\n")
        line += b.num_lines
    assert done.lines == 200 and done.text_bytes == len(payload)
    assert done.raw_bytes == len(raw) and done.sha256 == hashlib.sha256(raw).hexdigest()


def test_last_line_without_newline_and_long_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    long = b'{"text": "' + b"a" * 50_000 + b'"}'
    path.write_bytes(b"{}\n" + long + b"\n" + b'{"text": "end"}')
    blocks, _, done = collect(str(path), block_bytes=1000)
    assert b"".join(b.data for b in blocks) == path.read_bytes()
    assert blocks[-1].data.endswith(b'"end"}') and blocks[-1].num_lines == 1
    assert done.lines == 3


@pytest.mark.parametrize("how,ext", [("gzip", ".jsonl.gz"), ("zstd", ".jsonl.zst")])
def test_truncated_stream_is_reported(tmp_path, payload, how, ext):
    payload = payload * 8  # several 128 KB zstd blocks: a cut in the last one
    raw = compress(payload, how)
    path = tmp_path / f"cut{ext}"
    path.write_bytes(raw[:-64])
    blocks, fails, done = collect(str(path), block_bytes=4096)
    assert len(fails) == 1 and fails[0].record.reason is SkipReason.TRUNCATED_INPUT
    data = b"".join(b.data for b in blocks)
    assert payload.startswith(data) and data.endswith(b"\n") and 0 < len(data) < len(payload)
    assert fails[0].record.line == data.count(b"\n") + 1 == done.lines + 1
    assert done.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_gzip_is_reported(tmp_path, payload):
    raw = bytearray(gzip.compress(payload))
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(raw))
    _, fails, _ = collect(str(path), block_bytes=4096)
    assert len(fails) == 1 and fails[0].record.reason is SkipReason.CORRUPT_INPUT


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path, payload):
    half = payload.index(b"\n", len(payload) // 2) + 1
    for how, ext in (("gzip", ".gz"), ("zstd", ".zst")):
        path = tmp_path / f"multi.jsonl{ext}"
        path.write_bytes(compress(payload[:half], how) + compress(payload[half:], how))
        blocks, fails, _ = collect(str(path), block_bytes=4096)
        assert not fails and b"".join(b.data for b in blocks) == payload


def test_the_compression_comes_from_the_name(tmp_path):
    names = {"a.jsonl": "none", "a.json": "none", "a.ndjson": "none", "a.jsonl.gz": "gzip",
             "a.jsonl.zst": "zstd", "a.jsonl.zstd": "zstd", "a.parquet": "parquet", "A.PARQUET": "parquet"}
    assert {name: compression_of(name) for name in names} == names
    with pytest.raises(ValueError, match="compression must be one of"):
        next(read_file(0, str(tmp_path / "a.jsonl.bz2"), compression="bzip2"))


def test_resolve_inputs(tmp_path):
    for name in ("b.jsonl", "a.jsonl.gz", "c.jsonl.zst"):
        write_jsonl(str(tmp_path / name), [{"text": "x"}], "gzip" if name.endswith("gz") else "none")
    got = resolve_inputs([str(tmp_path / "*.jsonl*"), str(tmp_path / "b.jsonl")])
    assert [os.path.basename(p) for p in got] == ["a.jsonl.gz", "b.jsonl", "c.jsonl.zst"]
    with pytest.raises(InputNotFoundError, match="missing.jsonl: input file not found"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputNotFoundError, match="matches no files"):
        resolve_inputs([str(tmp_path / "*.nothing")])
    (tmp_path / "x.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="x.csv: unsupported input type"):
        resolve_inputs([str(tmp_path / "x.csv")])
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="plain_dir: a directory without state.json"):
        resolve_inputs([str(tmp_path / "plain_dir")])


def test_read_blocks_numbers_files(tmp_path):
    a = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": "1"}, {"text": "2"}])
    b = write_jsonl(str(tmp_path / "b.jsonl"), [{"text": "3"}])
    items = list(read_blocks([a, b]))
    assert [(type(i).__name__, i.file_index) for i in items] == [
        ("Block", 0), ("FileDone", 0), ("Block", 1), ("FileDone", 1)]
