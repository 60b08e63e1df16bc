"""The comparison: paired differences with bootstrap intervals, per-domain losses, seeds, verdicts."""

import numpy as np
import pytest

from megatron_miniplm.evaluation.compare import paired_difference, per_domain
from megatron_miniplm.evaluation.lm_loss import lm_loss_from_scores
from megatron_miniplm.evaluation.report import markdown, summarize
from megatron_miniplm.evaluation.table import format_table


def _numpy_bootstrap(a, b, samples, seed, level):
    """The reference: one resample at a time, as the textbook writes it."""
    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = [d[rng.integers(0, d.size, size=d.size)].mean() for _ in range(samples)]
    tail = 100 * (1 - level) / 2
    return d.mean(), *np.percentile(means, [tail, 100 - tail])


@pytest.mark.parametrize("level", [0.95, 0.9])
def test_paired_difference_equals_a_numpy_reference(level):
    rng = np.random.default_rng(3)
    a = rng.gamma(4.0, 1.0, size=257)
    b = a + rng.normal(0.02, 0.3, size=257)
    got = paired_difference([a], [b], samples=2000, seed=11, level=level, block=97)
    mean, low, high = _numpy_bootstrap(a, b, 2000, 11, level)
    assert got.mean == pytest.approx(mean, abs=1e-12)
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert got.instances == 257 and got.level == level


def test_a_known_shift_is_detected_and_said():
    rng = np.random.default_rng(5)
    base = rng.gamma(4.0, 1.0, size=300)  # instances differ a lot; the pairing removes that
    miniplm = base + rng.normal(0, 0.1, size=300) - 0.06
    uniform = base + rng.normal(0, 0.1, size=300)
    d = paired_difference([miniplm], [uniform], samples=4000, seed=0)
    assert d.high < 0 and d.excludes_zero
    assert d.mean == pytest.approx(-0.06, abs=0.02)
    # one seed each: the interval is over test instances only, and the sentence says so
    said = d.verdict("student-miniplm", "student-uniform")
    assert "covers test instances only" in said and "cannot tell a method effect from seed noise" in said
    assert " at 95%" not in said
    seeds = 2 * [miniplm], 2 * [uniform]  # two seeds each, the same losses: no seed noise
    assert paired_difference(*seeds, samples=4000, seed=0).verdict("a", "b").endswith(
        "a is lower at 95% over test instances and training seeds")
    up = paired_difference(seeds[1], seeds[0], samples=4000, seed=0)
    assert up.low > 0 and up.verdict("a", "b").endswith("a is higher at 95% over test instances and training seeds")


def test_no_shift_gives_an_interval_containing_zero_in_at_least_90_percent_of_trials():
    contains = 0
    for trial in range(100):
        rng = np.random.default_rng(1000 + trial)
        base = rng.gamma(4.0, 1.0, size=200)
        a, b = base + rng.normal(0, 0.2, size=200), base + rng.normal(0, 0.2, size=200)
        d = paired_difference([a, a], [b, b], samples=1000, seed=trial)
        contains += d.low <= 0 <= d.high
        if d.low <= 0 <= d.high:
            assert d.verdict("a", "b").endswith("not distinguishable from zero at 95% over test instances and "
                                                "training seeds")
    assert contains >= 90


def test_instances_without_counted_tokens_are_left_out_and_shapes_must_match():
    a = np.array([1.0, np.nan, 3.0, 2.0])
    b = np.array([0.5, 2.0, np.nan, 1.0])
    assert paired_difference([a], [b], samples=100).instances == 2
    with pytest.raises(ValueError, match="same instances"):
        paired_difference([a], [b[:3]])


def _scores(rng, n, shift=0.0):
    counts = rng.integers(1, 50, size=n).astype(np.float64)
    counts[::17] = 0  # instances with nothing counted
    per_token = rng.gamma(4.0, 1.0, size=n) + shift
    return np.stack([per_token * counts, counts], axis=1)


def test_per_domain_losses_recombine_to_the_overall_loss():
    rng = np.random.default_rng(8)
    scores = _scores(rng, 500)
    domains = rng.integers(0, 4, size=500)
    names = ["code", "prose", "tests", "empty-domain", "never-seen"]
    overall = lm_loss_from_scores(scores)
    per = per_domain(np.where(scores[:, 1] > 0, scores[:, 0] / np.maximum(scores[:, 1], 1), np.nan), domains, names)
    assert set(per) == {"code", "prose", "tests", "empty-domain"}
    assert sum(p["instances"] for p in per.values()) == overall["instances"]
    weighted = sum(p["lm_loss"] * p["instances"] for p in per.values()) / overall["instances"]
    assert weighted == pytest.approx(overall["lm_loss"], abs=1e-12)


def test_seeds_are_pooled_and_their_spread_reported():
    rng = np.random.default_rng(2)
    n = 400
    domains = rng.integers(0, 2, size=n)
    base = _scores(rng, n)
    noisy = lambda s, shift: np.stack([s[:, 0] + shift * s[:, 1] + rng.normal(0, 0.05, n) * s[:, 1], s[:, 1]], 1)
    runs = {"miniplm": [("m1", noisy(base, -0.1)), ("m2", noisy(base, -0.1)), ("m3", noisy(base, -0.1))],
            "uniform": [("u1", noisy(base, 0.0)), ("u2", noisy(base, 0.0)), ("u3", noisy(base, 0.0))],
            "teacher": [("t", noisy(base, -2.0))]}
    res = summarize(runs, domains, ["code", "prose"], bootstrap_samples=1000, seed=4)
    m = res["models"]["miniplm"]
    per_seed = [lm_loss_from_scores(s)["lm_loss"] for _, s in runs["miniplm"]]
    assert m["seeds"] == 3 and m["lm_loss"] == pytest.approx(np.mean(per_seed))
    assert m["lm_loss_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert res["models"]["teacher"]["lm_loss_std"] is None
    c = res["comparisons"]["uniform"]
    assert c["overall"]["excludes_zero"] and c["overall"]["high"] < 0
    assert c["overall"]["mean"] == pytest.approx(-0.1, abs=0.02)
    assert set(c["domains"]) == {"code", "prose"}
    assert res["verdicts"][0].startswith("miniplm − uniform = -0.")
    assert res["verdicts"][0].endswith("miniplm is lower at 95% over test instances and training seeds")
    assert "cannot tell a method effect from seed noise (train >= 2 seeds of each)" in res["verdicts"][1]
    table = format_table(res)
    assert "LM loss per domain" in table and "± " in table and "(all)" in table and " *" in table
    report = markdown(res, curves="curves.png")
    assert "| uniform |" in report and "![validation loss" in report and res["verdicts"][1] in report


def test_a_size_sweep_is_compared_within_each_size():
    rng = np.random.default_rng(6)
    n = 200
    base = _scores(rng, n)
    shifted = lambda shift: np.stack([base[:, 0] + shift * base[:, 1], base[:, 1]], 1)
    runs = {"a@s": [("c1", shifted(0.0))], "b@s": [("c2", shifted(0.1))],
            "a@l": [("c3", shifted(-0.5))], "b@l": [("c4", shifted(-0.2))], "teacher": [("t", shifted(-1.0))]}
    res = summarize(runs, None, [], bootstrap_samples=200, seed=0)
    # each method against the first method at its own size; the first's other sizes and the
    # models without a size against the first model
    assert res["comparisons"]["b@l"]["base"] == "a@l" and "base" not in res["comparisons"]["b@s"]
    assert "base" not in res["comparisons"]["a@l"] and "base" not in res["comparisons"]["teacher"]
    assert res["comparisons"]["b@l"]["overall"]["mean"] == pytest.approx(-0.3)
    assert res["verdicts"][2].startswith("a@l − b@l = -0.3000")
    assert "b@l (from a@l)" in format_table(res) and "| b@l (from a@l) |" in markdown(res)


@pytest.mark.parametrize("mode", ["miniplm", "packed"])
def test_test_documents_are_the_documents_instances_start_in(tmp_path, mode):
    """Instances cut by preprocessing's builder from documents of two domains, interleaved in
    input order: instances that start in one document get one id, other documents other ids."""
    from corpus import write_dataset

    from megatron_miniplm.data.instances import InstanceBuilder
    from megatron_miniplm.evaluation.report import test_documents

    rng = np.random.default_rng(0)
    builder = InstanceBuilder(mode, seq_length=16)
    for doc in range(40):  # every token of document k is k + 1; EOD (0) ends it
        tokens = np.append(np.full(int(rng.integers(3, 40)), doc + 1), 0)
        flags = np.zeros(tokens.size, dtype=bool)
        flags[-1] = True
        builder.add(tokens, domain=doc % 2, flags=flags)
    built = builder.flush()
    instances = np.split(built.tokens, np.cumsum(built.lengths)[:-1])
    write_dataset(str(tmp_path / "test"), instances, 64, 16, mode=mode, domains=built.domains)
    got = test_documents(str(tmp_path / "test"), np.asarray(built.domains))
    # the document an instance starts in, read off its tokens: its first token's, or, where it
    # starts with the EOD that ends a document, the document of the domain's previous instance
    starts, last = [], {}
    for x, domain in zip(instances, built.domains):
        starts.append(x[0] if x[0] != 0 else last[domain])
        last[domain] = x[x != 0][-1] if (x != 0).any() else last[domain]
    for i in range(len(instances)):
        for j in range(len(instances)):
            assert (got[i] == got[j]) == (starts[i] == starts[j])
    assert len(set(got)) > 10 and len(set(got)) < len(instances)  # documents longer than an instance


def test_a_reordered_blend_has_no_document_numbering(tmp_path):
    import json

    from corpus import write_dataset

    from megatron_miniplm.evaluation.report import test_documents

    prefix = write_dataset(str(tmp_path / "blend"), [np.array([5, 6, 0, 7]), np.array([8, 0])], 64, 4)
    meta = json.load(open(prefix + ".meta.json"))
    json.dump({**meta, "selection": {"order": "shuffled"}}, open(prefix + ".meta.json", "w"))
    assert test_documents(prefix, np.zeros(2, dtype=np.int32)) is None
    json.dump({**meta, "selection": {"order": "original"}}, open(prefix + ".meta.json", "w"))
    assert test_documents(prefix, np.zeros(2, dtype=np.int32)).tolist() == [0, 1]


def test_each_verdict_ends_with_the_training_compute():
    """Equal FLOPs are said as such; unequal ones as a ratio; unknown ones not at all."""
    from megatron_miniplm.evaluation.report import with_compute

    results = {"baseline_of_comparison": "a", "comparisons": {"b": {}, "c": {}, "t": {}},
               "verdicts": ["a − b ...", "a − c ...", "a − t ..."],
               "models": {"a": {"train_flops": 4.0e13}, "b": {"train_flops": 4.01e13},
                          "c": {"train_flops": 1.6e14}, "t": {}}}
    with_compute(results)
    assert results["verdicts"] == ["a − b ...; at equal training FLOPs (4e+13)",
                                   "a − c ...; c trained with 4x the FLOPs of a", "a − t ..."]


def test_the_table_shows_zero_shot_tasks_beside_the_comparisons():
    """Every model's task metrics are printed, with or without a paired comparison above them."""
    rng = np.random.default_rng(8)
    base = _scores(rng, 60)
    res = summarize({"a": [("c1", base)], "b": [("c2", base * [1.01, 1])]}, None, [], bootstrap_samples=50)
    res["models"]["a"]["tasks"] = {"piqa": {"acc_norm": 0.6125}}
    res["models"]["b"]["tasks"] = {"piqa": {"missing": "no data"}}
    table = format_table(res)
    assert "(all)" in table
    assert "piqa: acc_norm 0.6125" in table and "piqa: missing (no data)" in table


def test_the_report_names_what_the_bootstrap_resampled():
    """Documents where the test set's documents are known; instances, said as such, where not."""
    rng = np.random.default_rng(9)
    base = _scores(rng, 60)
    runs = {"a": [("c1", base)], "b": [("c2", base * [1.01, 1])]}
    by_document = markdown(summarize(runs, None, [], documents=np.arange(60) // 3, bootstrap_samples=50))
    assert "a bootstrap over the test set's documents (50 resamples" in by_document
    by_instance = markdown(summarize(runs, None, [], bootstrap_samples=50))
    assert "a bootstrap over the test set's instances (its documents are not known" in by_instance
