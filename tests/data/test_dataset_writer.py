"""Dataset writing: spilled index and columns, domain statistics, atomic commit, shards.
(The .bin/.idx bytes themselves are compared with megatron-core's in test_indexed_dataset.)"""
import json
import os

import numpy as np
import pytest

from megatron_miniplm.data.dataset_writer import DatasetWriter, write_npy
from megatron_miniplm.data.indexed_dataset import IndexedDatasetReader, SpilledArray
from megatron_miniplm.data.instances import Instances
from megatron_miniplm.data.meta import dataset_prefixes, read_dataset_meta

from .conftest import dataset_files, read_instances


def random_sequences(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 50))) for _ in range(n)]


@pytest.mark.parametrize("vocab", [500, 100_000])
def test_token_dtype_follows_the_vocabulary(tmp_path, vocab):
    seqs = random_sequences(300, vocab)
    prefix = str(tmp_path / "ds")
    w = DatasetWriter(prefix, vocab_size=vocab, eod_id=0, spill_entries=64)  # spills
    w.add(batch(seqs, [0] * len(seqs)))
    w.commit(COMMON, ["a"])
    got = IndexedDatasetReader(prefix)
    assert got.token_dtype == (np.uint16 if vocab < 65500 else np.int32)
    assert len(got) == 300 and all(np.array_equal(got[i], seqs[i]) for i in range(300))
    assert dataset_files(tmp_path) == ["ds.bin", "ds.domains.npy", "ds.idx", "ds.meta.json"]  # no spill files left


def test_spilled_array_and_npy(tmp_path):
    a = SpilledArray(str(tmp_path / "spill"), np.int32, capacity=7)
    want = []
    for i in range(5):
        a.append(i)
        want.append(i)
    a.extend(range(100, 130))
    want += list(range(100, 130))
    a.extend(np.arange(3))
    want += [0, 1, 2]
    assert len(a) == len(want)
    assert np.concatenate(list(a.chunks())).tolist() == want
    write_npy(str(tmp_path / "x.npy"), a)
    loaded = np.load(tmp_path / "x.npy")
    assert loaded.dtype == np.int32 and loaded.tolist() == want
    a.remove()
    assert not os.path.exists(tmp_path / "spill")


def batch(seqs, domains):
    return Instances.concat(seqs, domains)


COMMON = {"format_version": 1, "instance_mode": "miniplm", "seq_length": 8,
          "tokenizer": {"path": "t", "name": "t", "sha256": "0", "vocab_size": 500, "eod_id": 0, "pad_id": 0},
          "inputs": [], "skipped": {}}


def test_commit_writes_everything_and_abort_nothing(tmp_path):
    seqs = random_sequences(50, 500)
    prefix = str(tmp_path / "ds")
    w = DatasetWriter(prefix, vocab_size=500, eod_id=0, spill_entries=16)
    w.add(batch(seqs, [i % 3 for i in range(50)]))
    written = dataset_files(tmp_path)
    assert written and all(".tmp-" in f for f in written)  # temporaries only: nothing final yet
    meta = w.commit(COMMON, ["a", "b", "c"])
    assert dataset_files(tmp_path) == ["ds.bin", "ds.domains.npy", "ds.idx", "ds.meta.json"]
    assert meta == read_dataset_meta(prefix)
    assert meta["num_instances"] == 50 and meta["num_tokens"] == sum(map(len, seqs))
    assert meta["domain_stats"]["b"]["instances"] == 17
    assert meta["domain_stats"]["a"]["documents"] == sum(int((s == 0).sum()) for s in seqs[::3])
    assert np.load(prefix + ".domains.npy").tolist() == [i % 3 for i in range(50)]

    other = tmp_path / "other"
    other.mkdir()
    w = DatasetWriter(str(other / "ds"), vocab_size=500, eod_id=0)
    w.add(batch(seqs, [0] * 50))
    w.abort()
    assert dataset_files(other) == []
    with pytest.raises(ValueError, match="outside the vocabulary"):
        DatasetWriter(str(other / "ds"), vocab_size=10, eod_id=0).add(batch([np.array([3, 12])], [0]))


def test_shards(tmp_path):
    seqs = random_sequences(200, 500, seed=4)
    prefix = str(tmp_path / "ds")
    cap = 700
    w = DatasetWriter(prefix, vocab_size=500, eod_id=0, shard_size_tokens=cap)
    for i in range(0, 200, 30):  # batches that straddle shard ends
        w.add(batch(seqs[i:i + 30], [1] * len(seqs[i:i + 30])))
    top = w.commit(COMMON, ["a", "b"])
    shards = dataset_prefixes(prefix)
    assert len(shards) == len(top["shards"]) > 5
    assert shards[0] == prefix + "_00000"
    sizes = [read_dataset_meta(p)["num_tokens"] for p in shards]
    assert all(s <= cap for s in sizes) and all(s > cap - 50 for s in sizes[:-1])
    assert sum(sizes) == top["num_tokens"] == sum(map(len, seqs))
    assert top["domain_stats"]["b"]["instances"] == 200 and top["domain_stats"]["a"]["instances"] == 0
    got = read_instances(prefix)
    assert len(got) == 200 and all(np.array_equal(g, s) for g, s in zip(got, seqs))
    assert top["shard_fingerprints"] == [read_dataset_meta(p)["fingerprint"] for p in shards]

    # Rewriting unsharded at the same prefix removes the old shards.
    w = DatasetWriter(prefix, vocab_size=500, eod_id=0)
    w.add(batch(seqs[:3], [0, 0, 0]))
    w.commit(COMMON, ["a"])
    assert dataset_files(tmp_path) == ["ds.bin", "ds.domains.npy", "ds.idx", "ds.meta.json"]
    assert "shards" not in json.load(open(prefix + ".meta.json"))
