"""A full disk while preprocessing: one DiskFullError naming the file and the space, nothing
left under the output prefix (not even temporaries), and a rerun after space is freed gives
the dataset a run on an empty disk gives."""
import contextlib
import io
import os

import numpy as np
import pytest

from disk_full import FullDisk
from megatron_miniplm import atomic_io
from megatron_miniplm.atomic_io import DiskFullError
from megatron_miniplm.data import dataset_writer, indexed_dataset, meta

from .conftest import make_records, write_jsonl

WRITERS = (atomic_io, indexed_dataset, dataset_writer, meta)


def _files(directory) -> dict:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_preprocess_stops_at_every_write_and_completes_when_rerun(tmp_path, monkeypatch, bpe_tokenizer):
    from megatron_miniplm.data.config import PreprocessConfig
    from megatron_miniplm.data.preprocess import preprocess

    corpus = write_jsonl(str(tmp_path / "in.jsonl"), make_records(120, seed=3))
    out = tmp_path / "out"
    out.mkdir()

    def run():
        return preprocess(PreprocessConfig(inputs=[corpus], output_prefix=str(out / "ds"), tokenizer=bpe_tokenizer,
                                           seq_length=32, shard_size_tokens=3000, progress=False))

    disk = FullDisk(monkeypatch, WRITERS)
    run()
    want = _files(out)
    assert len(want) > 8  # several shards
    sites, counted = disk.sites(), list(disk.writes)
    assert len(sites) > 10
    for name in list(want):
        os.remove(out / name)
    for k in sites:
        disk.fail_at(k, counted)
        with pytest.raises(DiskFullError) as err:
            run()
        message = str(err.value)
        assert message.startswith(str(out / "ds")) and "no space left on the device" in message, message
        assert "bytes free there" in message
        assert os.listdir(out) == [], (k, os.listdir(out))
    disk.budget = None  # space freed
    run()
    assert _files(out) == want


def test_the_index_names_the_bytes_it_needs(tmp_path, monkeypatch):
    from megatron_miniplm.data.indexed_dataset import IndexedDatasetWriter

    disk = FullDisk(monkeypatch, WRITERS)
    w = IndexedDatasetWriter(str(tmp_path / "x.bin"), np.uint16, spill_entries=4)
    for _ in range(10):
        w.add_document(np.arange(5, dtype=np.uint16), [2, 3])  # spills the index (34-byte header, 20 sizes and pointers, 11 document starts)
    disk.budget = 0
    with pytest.raises(DiskFullError, match=rf"x\.idx: no space left on the device \({34 + 12 * 20 + 8 * 11} bytes needed"):
        w.finalize(str(tmp_path / "x.idx"))
    w.abort()
    assert os.listdir(tmp_path) == ["x.idx"]  # the caller's temporary name: DatasetWriter removes it


def test_the_tool_says_it_in_one_line(tmp_path, monkeypatch, bpe_tokenizer):
    from megatron_miniplm.cli.preprocess_data import main

    corpus = write_jsonl(str(tmp_path / "in.jsonl"), make_records(20, seed=4))
    FullDisk(monkeypatch, WRITERS, budget=100)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["--input", corpus, "--output-prefix", str(tmp_path / "ds"), "--tokenizer", bpe_tokenizer,
                       "--no-progress"])
    lines = [ln for ln in err.getvalue().splitlines() if not ln.startswith(("INFO:", "WARNING:"))]
    assert status == 1 and len(lines) == 1, err.getvalue()
    assert f"error: {tmp_path / 'ds'}" in lines[0] and "no space left on the device" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_text_files_leave_no_temporary(tmp_path, monkeypatch):
    FullDisk(monkeypatch, WRITERS, budget=3)
    with pytest.raises(DiskFullError, match=r"a\.json: no space left on the device \(\d+ bytes needed"):
        atomic_io.write_json_atomic(str(tmp_path / "a.json"), {"k": "v" * 100})
    assert os.listdir(tmp_path) == []
