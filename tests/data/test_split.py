"""The D_ref split: a deterministic partition of the instances, recorded both ways."""
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_miniplm.data.meta import read_dataset_meta, verify_fingerprint
from megatron_miniplm.data.split import instance_keys, split_dataset
from megatron_miniplm.data.config import SplitConfig

from .conftest import make_records, read_domains, read_instances, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bpe_tokenizer):
    """A sharded miniplm dataset of a few hundred instances."""
    from megatron_miniplm.data.preprocess import preprocess
    from megatron_miniplm.data.config import PreprocessConfig

    d = tmp_path_factory.mktemp("split_src")
    path = write_jsonl(str(d / "in.jsonl"), make_records(200, seed=11))
    prefix = str(d / "src")
    preprocess(PreprocessConfig([path], prefix, bpe_tokenizer, seq_length=24, workers=1, progress=False,
                                shard_size_tokens=3000))
    return prefix


def run_split(tmp_path, src, tag="", **kw):
    cfg = SplitConfig(src, str(tmp_path / f"ref{tag}"), str(tmp_path / f"rest{tag}"), **kw)
    split_dataset(cfg)
    return cfg.ref_prefix, cfg.rest_prefix


def check_partition(src, ref, rest):
    source = read_instances(src)
    src_domains = read_domains(src)
    idx_ref = np.load(ref + ".source_index.npy")
    idx_rest = np.load(rest + ".source_index.npy")
    both = np.concatenate([idx_ref, idx_rest])
    assert len(both) == len(source) and np.array_equal(np.sort(both), np.arange(len(source)))  # a partition
    for prefix, idx in ((ref, idx_ref), (rest, idx_rest)):
        assert np.all(np.diff(idx) > 0)  # input order kept
        got = read_instances(prefix)
        assert len(got) == len(idx)
        assert all(np.array_equal(g, source[i]) for g, i in zip(got, idx))
        assert np.array_equal(read_domains(prefix), src_domains[idx])
        meta = read_dataset_meta(prefix)
        verify_fingerprint(prefix)
        assert meta["num_tokens"] == sum(len(g) for g in got)
        assert meta["domains"] == read_dataset_meta(src)["domains"]
    return source, idx_ref


def test_fraction_split_is_an_exact_deterministic_partition(tmp_path, dataset):
    ref, rest = run_split(tmp_path, dataset, ref_fraction=0.2, seed=3)
    source, idx_ref = check_partition(dataset, ref, rest)
    assert len(idx_ref) == round(0.2 * len(source))
    # D_ref is the key-order prefix: every ref key is below every rest key.
    keys = instance_keys(0, len(source), 3)
    mask = np.zeros(len(source), bool)
    mask[idx_ref] = True
    assert keys[mask].max() < keys[~mask].min()
    meta = read_dataset_meta(ref)
    assert meta["split"]["part"] == "ref" and meta["split"]["source_fingerprint"] == read_dataset_meta(dataset)["fingerprint"]
    # Same seed, same split; another seed, another split.
    ref2, _ = run_split(tmp_path, dataset, tag="2", ref_fraction=0.2, seed=3)
    assert np.array_equal(np.load(ref2 + ".source_index.npy"), idx_ref)
    ref3, _ = run_split(tmp_path, dataset, tag="3", ref_fraction=0.2, seed=4)
    assert not np.array_equal(np.load(ref3 + ".source_index.npy"), idx_ref)


def test_token_split_takes_the_fewest_instances(tmp_path, dataset):
    total = read_dataset_meta(dataset)["num_tokens"]
    target = total // 10
    ref, rest = run_split(tmp_path, dataset, ref_tokens=target, seed=9)
    source, idx_ref = check_partition(dataset, ref, rest)
    lengths = np.array([len(s) for s in source])
    assert lengths[idx_ref].sum() >= target
    keys = instance_keys(0, len(source), 9)
    last = idx_ref[np.argmax(keys[idx_ref])]  # the last instance taken in key order
    assert lengths[idx_ref].sum() - lengths[last] < target


def test_split_errors(tmp_path, dataset):
    with pytest.raises(ValueError, match="exactly one"):
        run_split(tmp_path, dataset)
    with pytest.raises(ValueError, match="rest would be empty"):
        run_split(tmp_path, dataset, ref_tokens=10**12)
    with pytest.raises(ValueError, match="D_ref would be empty"):
        run_split(tmp_path, dataset, ref_fraction=1e-9)
    assert os.listdir(tmp_path) == []


def test_cli(tmp_path, dataset):
    cmd = [sys.executable, os.path.join(REPO, "tools", "split_dataset.py"), "--input-prefix", dataset,
           "--ref-prefix", str(tmp_path / "r"), "--rest-prefix", str(tmp_path / "s"), "--ref-fraction", "0.25"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ref:" in r.stdout and "rest:" in r.stdout
    check_partition(dataset, str(tmp_path / "r"), str(tmp_path / "s"))
