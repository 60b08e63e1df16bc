"""read_dataset_meta / dataset_prefixes / verify_fingerprint: clear errors naming the file."""
import json

import numpy as np
import pytest

from megatron_miniplm.data.dataset_writer import DatasetWriter
from megatron_miniplm.data.instances import Instances
from megatron_miniplm.data.meta import (
    DatasetMetaError, dataset_prefixes, read_dataset_meta, verify_fingerprint,
)

COMMON = {"format_version": 1, "instance_mode": "packed", "seq_length": 4,
          "tokenizer": {"path": "t", "name": "t", "sha256": "0", "vocab_size": 9, "eod_id": 0, "pad_id": 0},
          "inputs": [], "skipped": {}}


def write(prefix, shard=None):
    w = DatasetWriter(prefix, vocab_size=9, eod_id=0, shard_size_tokens=shard)
    w.add(Instances.concat([np.array([1, 2, 0]), np.array([3, 0]), np.array([4, 5, 6, 0])], [0, 0, 0]))
    return w.commit(COMMON, ["d"])


def test_missing_and_invalid_meta(tmp_path):
    p = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope.meta.json: dataset meta file not found"):
        read_dataset_meta(p)
    (tmp_path / "bad.meta.json").write_text('{\n"format_version": 1,\n oops}')
    with pytest.raises(DatasetMetaError, match=r"bad.meta.json:3: invalid JSON"):
        read_dataset_meta(str(tmp_path / "bad"))
    (tmp_path / "part.meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DatasetMetaError, match="part.meta.json: missing keys fingerprint"):
        read_dataset_meta(str(tmp_path / "part"))
    meta = write(str(tmp_path / "ok"))
    meta["format_version"] = 2
    (tmp_path / "v2.meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetMetaError, match="format_version 2"):
        read_dataset_meta(str(tmp_path / "v2"))


def test_prefixes_and_fingerprints(tmp_path):
    single = str(tmp_path / "single")
    meta = write(single)
    assert dataset_prefixes(single) == [single]
    for key in ("fingerprint", "num_instances", "num_tokens", "instance_mode", "seq_length", "domains"):
        assert key in meta
    assert meta["num_instances"] == 3 and meta["num_tokens"] == 9
    verify_fingerprint(single)

    sharded = str(tmp_path / "sh")
    top = write(sharded, shard=4)
    assert dataset_prefixes(sharded) == [sharded + "_00000", sharded + "_00001", sharded + "_00002"]
    assert top["shards"] == ["sh_00000", "sh_00001", "sh_00002"]
    verify_fingerprint(sharded)
    # Any change to an index is caught.
    with open(sharded + "_00001.idx", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x07")
    with pytest.raises(DatasetMetaError, match="sh_00001.idx: fingerprint"):
        verify_fingerprint(sharded)
