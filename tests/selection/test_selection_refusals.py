"""Every refusal of tools/difference_sample.py, and that a refused run writes nothing."""
import json
import os
import shutil

import numpy as np
import pytest

from megatron_miniplm.scoring.score_file import ScoreFileError, save_scores
from megatron_miniplm.selection.config import SelectionConfig, SelectionError
from megatron_miniplm.selection.sample import SampleRequest, run
from megatron_miniplm.selection.shards import DatasetError


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"  # must still not exist after a refused run
    yield d
    assert not d.exists(), f"a refused run wrote {list(d.iterdir())}"


def request(corpus, out_dir, teacher=None, reference=None, **cfg):
    cfg.setdefault("alpha", 0.5)
    return SampleRequest(data_paths=list(corpus.prefixes), output=str(out_dir / "blend"), config=SelectionConfig(**cfg),
                         teacher_scores=teacher or list(corpus.teacher),
                         reference_scores=reference or list(corpus.reference), report_dir=str(out_dir / "report"))


def replaced(corpus, tmp_path, shard, array=None, fingerprint=None, role="teacher"):
    """The corpus' score prefixes of `role` with shard `shard` replaced by a modified file."""
    src = getattr(corpus, f"{role}_arrays")[shard]
    p = str(tmp_path / f"bad_{role}_{shard}")
    save_scores(p, src if array is None else array,
                {"dataset_fingerprint": fingerprint or corpus.metas[shard]["fingerprint"], "model": {"name": "bad"}})
    prefixes = list(getattr(corpus, role))
    prefixes[shard] = p
    return prefixes


def test_scores_of_another_dataset(corpus, tmp_path, out_dir):
    teacher = replaced(corpus, tmp_path, 2, fingerprint=corpus.metas[0]["fingerprint"])
    with pytest.raises(ScoreFileError, match="scores of another dataset"):
        run(request(corpus, out_dir, teacher=teacher))


def test_scores_of_another_length(corpus, tmp_path, out_dir):
    longer = np.concatenate([corpus.reference_arrays[0], [[3.0, 3.0]]])
    reference = replaced(corpus, tmp_path, 0, array=longer, role="reference")
    with pytest.raises(ScoreFileError, match="701 instances scored, but .* has 700"):
        run(request(corpus, out_dir, reference=reference))


def test_score_array_disagreeing_with_its_meta(corpus, tmp_path, out_dir):
    teacher = replaced(corpus, tmp_path, 0)
    np.save(teacher[0] + ".npy", corpus.teacher_arrays[0][:-1])  # rows no longer match the meta
    with pytest.raises(ScoreFileError, match="699 rows, but .* num_instances=700"):
        run(request(corpus, out_dir, teacher=teacher))


@pytest.mark.parametrize("value,col,role", [(np.nan, 0, "teacher"), (np.inf, 0, "reference"),
                                            (-np.inf, 0, "teacher"), (0.0, 1, "reference"), (np.nan, 1, "teacher")])
def test_non_finite_scores(corpus, tmp_path, out_dir, value, col, role):
    arr = getattr(corpus, f"{role}_arrays")[2].copy()
    arr[123, col] = value
    prefixes = replaced(corpus, tmp_path, 2, array=arr, role=role)
    with pytest.raises(SelectionError, match=r"without a finite difference score .* first: instance 123"):
        run(request(corpus, out_dir, **{role: prefixes}))


@pytest.mark.parametrize("shard", [0, 2])  # checked through one reused shard-sized buffer
def test_unused_score_files_are_checked_too(corpus, tmp_path, out_dir, shard):
    arr = corpus.reference_arrays[shard].copy()
    arr[5, 0] = np.nan
    reference = replaced(corpus, tmp_path, shard, array=arr, role="reference")
    with pytest.raises(SelectionError, match="instance 5"):
        run(request(corpus, out_dir, reference=reference, method="teacher"))


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.0000001, 1.5, float("nan"), float("inf")])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(SelectionError, match=r"alpha must be in \(0, 1\]"):
        SelectionConfig(alpha=alpha)


def test_config_needs_exactly_one_budget():
    with pytest.raises(SelectionError, match="exactly one"):
        SelectionConfig()
    with pytest.raises(SelectionError, match="exactly one"):
        SelectionConfig(alpha=0.5, keep_tokens=10)
    with pytest.raises(SelectionError, match="positive"):
        SelectionConfig(keep_tokens=0)
    with pytest.raises(SelectionError, match="method"):
        SelectionConfig(alpha=0.5, method="best")


def test_budget_larger_than_corpus(corpus, out_dir):
    total = int(corpus.lengths.sum())
    with pytest.raises(SelectionError, match=f"larger than the corpus \\({total:,} tokens\\)"):
        run(request(corpus, out_dir, alpha=None, keep_tokens=total + 1))


def test_empty_selections(corpus, out_dir):
    with pytest.raises(SelectionError, match="rounds to 0"):
        run(request(corpus, out_dir, alpha=1e-9))
    with pytest.raises(SelectionError, match="smaller than the first-ranked"):
        run(request(corpus, out_dir, alpha=None, keep_tokens=1))


def test_score_file_count_and_missing_scores(corpus, out_dir):
    with pytest.raises(SelectionError, match="2 score file\\(s\\) for 3 dataset shard"):
        run(request(corpus, out_dir, teacher=corpus.teacher[:2]))
    req = request(corpus, out_dir)
    req.reference_scores = None
    with pytest.raises(SelectionError, match="needs --reference-scores"):
        run(req)


def test_output_over_an_input(corpus, out_dir):
    req = request(corpus, out_dir)
    req.output = corpus.prefixes[1]
    with pytest.raises(SelectionError, match="same prefix as an input"):
        run(req)


def test_output_over_another_dataset(corpus, tmp_path, out_dir):
    other = tmp_path / "other"
    other.mkdir()
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(corpus.prefixes[0] + ext, str(other / "d") + ext)
    req = request(corpus, out_dir)
    req.output = str(other / "d")
    with pytest.raises(SelectionError, match="a dataset exists there"):
        run(req)


def test_missing_and_broken_files(corpus, tmp_path, out_dir):
    req = request(corpus, out_dir)
    req.data_paths = [str(tmp_path / "nope")]
    with pytest.raises(DatasetError, match="nope.meta.json: dataset meta file not found"):
        run(req)
    with pytest.raises(ScoreFileError, match="score meta file not found"):
        run(request(corpus, out_dir, teacher=[str(tmp_path / "t0"), *corpus.teacher[1:]]))


def test_shards_with_different_tokenizers(corpus, tmp_path, out_dir):
    copy = str(tmp_path / "copy")
    for ext in (".bin", ".idx", ".domains.npy"):
        shutil.copy(corpus.prefixes[0] + ext, copy + ext)
    meta = dict(corpus.metas[0], tokenizer=dict(corpus.metas[0]["tokenizer"], sha256="0" * 64))
    with open(copy + ".meta.json", "w") as f:
        json.dump(meta, f)
    req = request(corpus, out_dir)
    req.data_paths = [copy, *corpus.prefixes[1:]]
    with pytest.raises(SelectionError, match="different tokenizers"):
        run(req)


def test_selecting_from_a_blend_is_refused(corpus, tmp_path, out_dir):
    done = request(corpus, tmp_path / "first")
    run(done)
    req = request(corpus, out_dir)
    req.data_paths = [done.output]
    with pytest.raises(DatasetError, match="is a sampled blend"):
        run(req)
    assert os.path.exists(done.output + ".npy")
