"""The indexed-dataset format: our writer writes megatron-core's bytes, our reader reads
what megatron-core's reader reads, and the module stays free of torch and megatron."""
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_miniplm.data.indexed_dataset import (
    HEADER_SIZE, DomainStats, IndexedDatasetError, IndexedDatasetReader, IndexedDatasetWriter,
    optimal_token_dtype,
)

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64]


def documents(n, dtype, seed=0):
    """n documents of 1 to 3 sequences each (some empty), values that fit every dtype."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        seqs = [rng.integers(0, 100, size=int(rng.integers(0, 40))).astype(dtype)
                for _ in range(int(rng.integers(1, 4)))]
        docs.append(seqs)
    return docs


def write_both(tmp_path, docs, dtype, spill_entries=16):
    """The same documents through megatron-core's builder (a) and ours (b): half one
    document at a time, the one-sequence documents of the rest in one batch."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    stock = IndexedDatasetBuilder(str(tmp_path / "a.bin"), dtype=dtype)
    ours = IndexedDatasetWriter(str(tmp_path / "b.bin"), dtype, spill_entries)
    half = len(docs) // 2
    for seqs in docs[:half]:
        stock.add_document(np.concatenate(seqs), [len(s) for s in seqs])
        ours.add_document(np.concatenate(seqs), [len(s) for s in seqs])
    batch = [s for seqs in docs[half:] for s in seqs]
    for s in batch:
        stock.add_item(torch.from_numpy(s))
        stock.end_document()
    if batch:
        ours.add_sequences(np.concatenate(batch), [len(s) for s in batch])
    stock.finalize(str(tmp_path / "a.idx"))
    ours.finalize(str(tmp_path / "b.idx"))
    return [s for seqs in docs[:half] for s in seqs] + batch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 300])
def test_writer_writes_megatron_cores_bytes(tmp_path, dtype, n):
    write_both(tmp_path, documents(n, dtype), dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes(), ext
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]  # spill files removed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 300])
def test_reader_reads_what_megatron_core_reads(tmp_path, dtype, n):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, _IndexReader

    sequences = write_both(tmp_path, documents(n, dtype, seed=n), dtype)
    # megatron-core's readers on megatron-core's files; its IndexedDataset cannot map an
    # empty .bin, so the index is compared through the reader it uses for the .idx.
    stock = _IndexReader(str(tmp_path / "a.idx"), multimodal=False)
    ours = IndexedDatasetReader(str(tmp_path / "a"))
    assert ours.token_dtype == np.dtype(stock.dtype) == np.dtype(dtype)
    assert len(ours) == len(stock) == len(sequences)
    np.testing.assert_array_equal(ours.lengths, stock.sequence_lengths)
    np.testing.assert_array_equal(ours.pointers, stock.sequence_pointers)
    np.testing.assert_array_equal(ours.document_indices, stock.document_indices)
    assert ours.num_tokens == sum(len(s) for s in sequences)
    if ours.num_tokens:
        stock_data = IndexedDataset(str(tmp_path / "a"))
        for i in range(len(sequences)):
            got = ours[i]
            assert got.dtype == stock_data[i].dtype and np.array_equal(got, stock_data[i])
    for i in range(len(sequences)):
        assert np.array_equal(ours[i], sequences[i])
    if sequences:
        np.testing.assert_array_equal(ours.span(0, len(sequences)), np.concatenate(sequences))
    assert len(ours.span(0, 0)) == 0


def test_optimal_token_dtype_is_megatron_cores():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (None, 1, 65499, 65500, 100_000):
        assert optimal_token_dtype(vocab) == np.dtype(DType.optimal_dtype(vocab))


def test_writer_refuses_tokens_that_do_not_match_the_lengths(tmp_path):
    w = IndexedDatasetWriter(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(ValueError, match="5 tokens for sequences of 4"):
        w.add_sequences(np.arange(5), [2, 2])
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="no code"):
        IndexedDatasetWriter(str(tmp_path / "y.bin"), np.uint32)
    assert os.listdir(tmp_path) == []


def test_reader_refuses_damaged_files(tmp_path):
    prefix = str(tmp_path / "d")
    w = IndexedDatasetWriter(prefix + ".bin", np.uint16)
    w.add_sequences(np.arange(10), [4, 6])
    w.finalize(prefix + ".idx")
    good_idx, good_bin = open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()
    assert len(IndexedDatasetReader(prefix)) == 2

    with open(prefix + ".bin", "wb") as f:
        f.write(good_bin[:-2])
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: 18 bytes, the index needs 20"):
        IndexedDatasetReader(prefix)
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"d\.bin: data file not found"):
        IndexedDatasetReader(prefix)
    with open(prefix + ".bin", "wb") as f:
        f.write(good_bin)

    for damaged, message in ((b"XXXXXXXXX" + good_idx[9:], "bad header"),
                             (good_idx[:HEADER_SIZE - 1], "bad header"),
                             (good_idx[:9] + b"\x02" + good_idx[10:], "unsupported index version 2"),
                             (good_idx[:17] + b"\x09" + good_idx[18:], "dtype code 9"),
                             (good_idx[:-1], "truncated")):
        with open(prefix + ".idx", "wb") as f:
            f.write(damaged)
        with pytest.raises(IndexedDatasetError, match=message):
            IndexedDatasetReader(prefix)
    os.remove(prefix + ".idx")
    with pytest.raises(FileNotFoundError, match=r"d\.idx: index file not found"):
        IndexedDatasetReader(prefix)


def test_domain_stats():
    stats = DomainStats()
    tokens = np.array([5, 0, 7, 0, 0, 3, 0])
    # instances [5 0] [] [7 0 0] [3 0] in domains 2, 0, 2, 1; 0 is the EOD
    stats.add(tokens, [2, 0, 3, 2], [2, 0, 2, 1], eod_id=0)
    assert stats.to_meta(["a", "b", "c", "d"]) == {
        "a": {"documents": 0, "instances": 1, "tokens": 0},
        "b": {"documents": 1, "instances": 1, "tokens": 2},
        "c": {"documents": 3, "instances": 2, "tokens": 5},
        "d": {"documents": 0, "instances": 0, "tokens": 0},
    }
    assert stats.num_documents == 4
    stats.add(np.zeros(0, np.int64), [], [], eod_id=0)  # an empty batch changes nothing
    other = DomainStats()
    other.add(np.array([1, 2, 0, 0]), [4], [3], eod_id=None)  # no EOD id: documents not counted
    stats.merge(other)
    assert stats.to_meta(["a", "b", "c", "d"])["d"] == {"documents": 0, "instances": 1, "tokens": 4}
    assert stats.to_meta(["a", "b", "c", "d"])["c"]["tokens"] == 5


def test_importing_the_format_module_imports_no_torch_or_megatron():
    code = ("import sys, megatron_miniplm.data.indexed_dataset; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
