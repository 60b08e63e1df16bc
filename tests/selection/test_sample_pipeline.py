"""tools/difference_sample.py end to end on small datasets: blends, baselines, the blend
format, --materialize and --report, each checked against numpy."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from selection_helpers import EOD, ref_budget, ref_difference, ref_ranking, ref_top_k, to_pairs

from megatron_miniplm.selection.blend import BlendReader, dataset_prefixes, is_blend, load_blend
from megatron_miniplm.selection.difference import instances_to_keep
from megatron_miniplm.selection.config import SelectionConfig
from megatron_miniplm.selection.sample import SampleRequest, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sample(corpus, out, **kw):
    report = kw.pop("report", None)
    materialize = kw.pop("materialize", False)
    scores = kw.pop("scores", ("teacher", "reference"))
    req = SampleRequest(data_paths=corpus.prefixes, output=out, config=SelectionConfig(**kw),
                        teacher_scores=corpus.teacher if "teacher" in scores else None,
                        reference_scores=corpus.reference if "reference" in scores else None,
                        report_dir=report, materialize=materialize)
    return run(req)


def expected(corpus, method, alpha=None, keep_tokens=None):
    t, r = corpus.all_scores("teacher"), corpus.all_scores("reference")
    score, asc = {"difference": (ref_difference(t, r), False), "teacher": (t[:, 0] / t[:, 1], True),
                  "reference": (r[:, 0] / r[:, 1], False)}[method]
    if keep_tokens is not None:
        return ref_budget(score, corpus.lengths, keep_tokens, asc)
    return ref_top_k(score, instances_to_keep(alpha, score.size), asc)


@pytest.mark.parametrize("method", ["difference", "teacher", "reference"])
def test_blend_equals_numpy_reference(corpus, tmp_path, method):
    out = str(tmp_path / "blend")
    meta = sample(corpus, out, method=method, alpha=0.3).meta
    rows, loaded = load_blend(out, verify=True)
    want = expected(corpus, method, alpha=0.3)
    np.testing.assert_array_equal(rows, to_pairs(want, corpus.offsets))
    assert loaded == meta and is_blend(out) and not is_blend(corpus.prefixes[0])
    assert meta["kind"] == "miniplm_sampled_blend" and meta["format_version"] == 1
    assert meta["num_selected"] == len(want) == round(0.3 * corpus.offsets[-1])
    assert meta["tokens_kept"] == int(corpus.lengths[want].sum())
    assert meta["tokens_total"] == int(corpus.lengths.sum()) and meta["num_instances_total"] == corpus.offsets[-1]
    assert [d["fingerprint"] for d in meta["datasets"]] == [m["fingerprint"] for m in corpus.metas]
    assert [os.path.abspath(p) for p in dataset_prefixes(out, meta)] == [os.path.abspath(p) for p in corpus.prefixes]
    assert len(meta["scores"]["teacher"]) == 3 and all(e["sha256"] for e in meta["scores"]["reference"])
    assert (meta["method"], meta["alpha"], meta["order"]) == (method, 0.3, "original")


def test_difference_selection_prefers_the_designed_domains(corpus, tmp_path):
    """The corpus gives 'code' a higher reference NLL: difference sampling must keep it most."""
    out = str(tmp_path / "blend")
    sample(corpus, out, alpha=0.3)
    rows, _ = load_blend(out)
    doms = np.concatenate(corpus.domains)
    kept = doms[corpus.offsets[rows[:, 0]] + rows[:, 1]]
    frac = np.bincount(kept, minlength=3) / np.bincount(doms, minlength=3)
    assert frac[1] > frac[0] and frac[1] > frac[2]


def test_shuffled_order_is_a_reproducible_permutation(corpus, tmp_path):
    base = sample(corpus, str(tmp_path / "a"), alpha=0.5).meta
    rows_a, _ = load_blend(str(tmp_path / "a"))
    s1 = sample(corpus, str(tmp_path / "b"), alpha=0.5, order="shuffled", seed=7).meta
    s2 = sample(corpus, str(tmp_path / "c"), alpha=0.5, order="shuffled", seed=7).meta
    s3 = sample(corpus, str(tmp_path / "d"), alpha=0.5, order="shuffled", seed=8).meta
    b, c, d = (load_blend(str(tmp_path / x))[0] for x in "bcd")
    np.testing.assert_array_equal(b, c)
    assert not np.array_equal(b, d) and not np.array_equal(b, rows_a)
    np.testing.assert_array_equal(b[np.lexsort((b[:, 1], b[:, 0]))], rows_a)
    assert s1["seed"] == 7 and s1["order"] == "shuffled" and s3["num_selected"] == base["num_selected"]
    assert s2["tokens_kept"] == base["tokens_kept"]


def test_token_budget(corpus, tmp_path):
    total = int(corpus.lengths.sum())
    for budget in (1000, total // 2, total):
        out = str(tmp_path / f"b{budget}")
        meta = sample(corpus, out, keep_tokens=budget).meta
        rows, _ = load_blend(out)
        want = expected(corpus, "difference", keep_tokens=budget)
        np.testing.assert_array_equal(rows, to_pairs(want, corpus.offsets))
        assert meta["tokens_kept"] == int(corpus.lengths[want].sum()) <= budget
        assert meta["keep_tokens"] == budget and meta["alpha"] is None


def test_uniform_baseline(corpus, tmp_path):
    meta = sample(corpus, str(tmp_path / "u1"), method="uniform", alpha=0.4, scores=()).meta
    again = sample(corpus, str(tmp_path / "u2"), method="uniform", alpha=0.4, scores=()).meta
    other = sample(corpus, str(tmp_path / "u3"), method="uniform", alpha=0.4, seed=99, scores=()).meta
    a, b, c = (load_blend(str(tmp_path / x))[0] for x in ("u1", "u2", "u3"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert meta["num_selected"] == again["num_selected"] == other["num_selected"] == round(0.4 * corpus.offsets[-1])
    assert meta["scores"] == {"teacher": [], "reference": []}
    # the same token budget as a difference selection, for a fair comparison
    tok = sample(corpus, str(tmp_path / "d"), alpha=0.4).meta["tokens_kept"]
    u = sample(corpus, str(tmp_path / "u4"), method="uniform", keep_tokens=tok, scores=()).meta
    assert tok - 48 < u["tokens_kept"] <= tok


def test_blend_reader_returns_the_selected_tokens(corpus, tmp_path):
    out = str(tmp_path / "blend")
    sample(corpus, out, alpha=0.2, order="shuffled")
    reader = BlendReader(out)
    rows, _ = load_blend(out)
    assert len(reader) == len(rows)
    for j in (0, 5, len(rows) - 1):
        s, i = rows[j]
        np.testing.assert_array_equal(reader[j], corpus.sequences[s][i])


def test_materialize_writes_a_readable_dataset(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = str(tmp_path / "selected")
    meta = sample(corpus, out, alpha=0.25, order="shuffled", seed=3, materialize=True).meta
    assert not os.path.exists(out + ".npy") and not is_blend(out)
    blend_out = str(tmp_path / "same_as_blend")
    sample(corpus, blend_out, alpha=0.25, order="shuffled", seed=3)
    rows, _ = load_blend(blend_out)
    ds = IndexedDataset(out)
    assert len(ds) == len(rows) == meta["num_instances"]
    for j in range(len(rows)):
        s, i = rows[j]
        np.testing.assert_array_equal(ds[j], corpus.sequences[s][i])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(rows) + 1))
    doms = np.load(out + ".domains.npy")
    np.testing.assert_array_equal(doms, [corpus.domains[s][i] for s, i in rows])
    import hashlib
    with open(out + ".idx", "rb") as f:
        assert meta["fingerprint"] == hashlib.sha256(f.read()).hexdigest()
    assert meta["num_tokens"] == sum(len(corpus.sequences[s][i]) for s, i in rows)
    assert meta["num_documents"] == sum(int((corpus.sequences[s][i] == EOD).sum()) for s, i in rows)
    assert meta["selection"]["method"] == "difference" and meta["tokenizer"] == corpus.metas[0]["tokenizer"]
    # the materialized dataset is itself a valid input to another selection
    from megatron_miniplm.selection.shards import open_shards
    (shard,) = open_shards([out])
    assert shard.num_instances == len(rows)


def test_report(corpus, tmp_path):
    out, rep = str(tmp_path / "blend"), str(tmp_path / "report")
    meta = sample(corpus, out, alpha=0.3, report=rep).meta
    for f in ("selection_report.md", "selection_report.json", "hist_teacher.png", "hist_reference.png",
              "hist_difference.png"):
        assert os.path.getsize(os.path.join(rep, f)) > 0, f
    with open(os.path.join(rep, "selection_report.json")) as f:
        report = json.load(f)
    rows, _ = load_blend(out)
    doms = np.concatenate(corpus.domains)
    g = corpus.offsets[rows[:, 0]] + rows[:, 1]
    for d, row in enumerate(report["domains"]):
        assert row["instances"] == int((doms == d).sum())
        assert row["instances_kept"] == int((doms[g] == d).sum())
        assert row["tokens_kept"] == int(corpus.lengths[g][doms[g] == d].sum())
    assert sum(r["instances_kept"] for r in report["domains"]) == meta["num_selected"]
    hist = report["histograms"]["difference"]
    assert sum(hist["all"]) == corpus.offsets[-1] and sum(hist["kept"]) == meta["num_selected"]
    top = report["examples"]["top"]
    diff = ref_difference(corpus.all_scores("teacher"), corpus.all_scores("reference"))
    assert top[0]["score"] == diff.max() and report["examples"]["bottom"][0]["score"] == diff.min()
    assert all(e["kept"] for e in top) and not any(e["kept"] for e in report["examples"]["bottom"])
    words = " ".join(f"w{t}" for t in corpus.sequences[top[0]["shard"]][top[0]["instance"]] if t != EOD)
    if top[0]["text"] is not None:  # decoded when the tokenizer loader is available
        assert top[0]["text"] == words
    with open(os.path.join(rep, "selection_report.md")) as f:
        md = f.read()
    assert "| code |" in md and "hist_difference.png" in md


def test_cli(corpus, tmp_path):
    out = str(tmp_path / "cli_blend")
    base = [sys.executable, os.path.join(ROOT, "tools", "difference_sample.py"), "--data-path", *corpus.prefixes,
            "--teacher-scores", *corpus.teacher, "--reference-scores", *corpus.reference]
    res = subprocess.run(base + ["--alpha", "0.5", "--output-prefix", out, "--data-order", "shuffled", "--seed", "5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "kept" in res.stdout
    rows, meta = load_blend(out)
    assert meta["seed"] == 5 and len(rows) == instances_to_keep(0.5, corpus.offsets[-1])
    bad = subprocess.run(base + ["--alpha", "1.5", "--output-prefix", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "alpha must be in (0, 1]" in bad.stderr
    assert not os.path.exists(str(tmp_path / "x.npy")) and not os.path.exists(str(tmp_path / "x.meta.json"))


@pytest.mark.parametrize("method", ["difference", "teacher", "reference"])
def test_instances_without_a_counted_prediction_rank_last(corpus, tmp_path, method):
    """The scorer writes (0, 0) for an instance with no counted prediction (one token, or only
    EOD inputs: the preprocessor emits [EOD] where a domain's last cut leaves its last EOD
    alone). Such an instance has no score: it ranks after every scored one (ties by index),
    in either direction, instead of refusing the run."""
    from megatron_miniplm.scoring.score_file import save_scores

    unscored = [(0, 5), (2, 0), (2, 899)]
    prefixes = {}
    for role in ("teacher", "reference"):
        prefixes[role] = []
        for s, arr in enumerate(getattr(corpus, f"{role}_arrays")):
            arr = arr.copy()
            for shard, i in unscored:
                if shard == s:
                    arr[i] = 0.0
            prefixes[role].append(str(tmp_path / f"{role}_{s}"))
            save_scores(prefixes[role][-1], arr, {"dataset_fingerprint": corpus.metas[s]["fingerprint"],
                                                  "model": {"name": role}})
    gone = np.array([corpus.offsets[s] + i for s, i in unscored])
    score = {"difference": ref_difference(corpus.all_scores("teacher"), corpus.all_scores("reference")),
             "teacher": -corpus.all_scores("teacher")[:, 0] / corpus.all_scores("teacher")[:, 1],
             "reference": corpus.all_scores("reference")[:, 0] / corpus.all_scores("reference")[:, 1]}[method]
    ranking = ref_ranking(np.delete(score, gone))
    ranking = np.concatenate([np.delete(np.arange(score.size), gone)[ranking], gone])  # unscored last
    scored_tokens = int(corpus.lengths.sum() - corpus.lengths[gone].sum())
    budgets = [{"alpha": 0.3}, {"alpha": 1.0}, {"keep_tokens": scored_tokens + int(corpus.lengths[gone[0]])}]
    for i, budget in enumerate(budgets):
        out = str(tmp_path / f"blend{i}")
        report = str(tmp_path / f"report{i}") if i == 0 else None
        run(SampleRequest(data_paths=corpus.prefixes, output=out, config=SelectionConfig(method=method, **budget),
                          teacher_scores=prefixes["teacher"], reference_scores=prefixes["reference"],
                          report_dir=report))
        rows, _ = load_blend(out)
        k = instances_to_keep(budget["alpha"], score.size) if "alpha" in budget else score.size - len(gone) + 1
        np.testing.assert_array_equal(rows, to_pairs(np.sort(ranking[:k]), corpus.offsets))
