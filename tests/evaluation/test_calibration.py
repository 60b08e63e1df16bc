"""The paired comparison's interval, calibrated on synthetic experiments with a known effect.

Each trial draws what a real comparison has: test documents of different difficulty with
several instances each, a model-by-document interaction (instances of one document move
together), instance noise, and a training-seed offset per trained model (seeds of one
method differ by about as much as the demo's did). With no effect the 95% interval must
contain zero in at least 90 of 100 trials; an instance bootstrap over seed-pooled losses
(one interval over test instances, taken as independent) does not, which is why the
interval resamples documents and adds the seeds' variance.
"""

import numpy as np

from megatron_miniplm.evaluation.compare import paired_difference, pooled, t_quantile

DOCS, PER_DOC, SEEDS = 24, 6, 3


def _experiment(rng, effect: float):
    """Per-seed losses of two methods over the same test set, and each instance's document."""
    documents = np.repeat(np.arange(DOCS), PER_DOC)
    difficulty = rng.normal(6.0, 1.0, DOCS)[documents] + rng.normal(0, 0.3, documents.size)

    def method(shift):
        interaction = rng.normal(0, 0.15, DOCS)[documents]
        return [difficulty + shift + interaction + rng.normal(0, 0.3) + rng.normal(0, 0.05, documents.size)
                for _ in range(SEEDS)]

    return method(effect), method(0.0), documents


def _coverage(effect: float, interval) -> int:
    """In how many of 100 seeded trials the interval contains zero."""
    contains = 0
    for trial in range(100):
        a, b, documents = _experiment(np.random.default_rng(trial), effect)
        d = interval(a, b, documents, trial)
        contains += d.low <= 0 <= d.high
    return contains


def _ours(a, b, documents, trial):
    return paired_difference(a, b, documents=documents, samples=1000, seed=trial)


def _instance_bootstrap(a, b, documents, trial):
    """The interval over test instances alone, seeds pooled first."""
    return paired_difference([pooled(a)], [pooled(b)], samples=1000, seed=trial)


def test_no_effect_is_covered_at_the_stated_level():
    assert _coverage(0.0, _ours) >= 90


def test_an_instance_bootstrap_over_pooled_seeds_is_overconfident():
    assert _coverage(0.0, _instance_bootstrap) < 90


def test_an_effect_larger_than_the_noise_is_found():
    assert _coverage(1.5, _ours) <= 20  # excludes zero in at least 80 of 100 trials


def test_one_seed_says_what_it_cannot_tell():
    a, b, documents = _experiment(np.random.default_rng(0), 1.0)
    d = paired_difference(a[:1], b[:1], documents=documents, samples=500)
    assert d.covers == "test documents only" and "cannot tell a method effect from seed noise" in d.verdict("x", "y")
    assert " at 95%" not in d.verdict("x", "y")
    three = paired_difference(a, b, documents=documents, samples=500)
    assert three.covers == "test documents and training seeds" and three.verdict("x", "y").endswith(
        "x is higher at 95% over test documents and training seeds")
    assert three.seeds == (3, 3) and three.documents == DOCS and three.seed_std > 0


def test_t_quantiles():
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042), (float("inf"), 1.960)):
        assert abs(t_quantile(0.975, df) - want) < 2e-3


def _shared_seed_experiment(rng, effect: float):
    """As ``_experiment``, but run k of both methods shares seed k: a shared seed offset (the
    same initial weights and data order move both runs alike) and a small method-specific one."""
    documents = np.repeat(np.arange(DOCS), PER_DOC)
    difficulty = rng.normal(6.0, 1.0, DOCS)[documents] + rng.normal(0, 0.3, documents.size)
    shared = rng.normal(0, 0.3, SEEDS)

    def method(shift):
        interaction = rng.normal(0, 0.15, DOCS)[documents]
        return [difficulty + shift + interaction + shared[k] + rng.normal(0, 0.05)
                + rng.normal(0, 0.05, documents.size) for k in range(SEEDS)]

    return method(effect), method(0.0), documents


def _paired_coverage(effect: float, experiment, same_seeds: bool) -> tuple[int, float]:
    """Trials of 100 whose interval contains zero, and the intervals' median width."""
    contains, widths = 0, []
    for trial in range(100):
        a, b, documents = experiment(np.random.default_rng(trial), effect)
        d = paired_difference(a, b, documents=documents, samples=1000, seed=trial, same_seeds=same_seeds)
        contains += d.low <= 0 <= d.high
        widths.append(d.high - d.low)
    return contains, float(np.median(widths))


def test_runs_that_share_seeds_are_compared_seed_by_seed():
    """Paired by seed, the interval keeps its level (with shared or independent seed noise) and
    leaves out what two runs of one seed share: narrower than the unpaired one where seeds
    are shared, and it finds an effect the unpaired interval cannot tell from seed noise."""
    paired, paired_width = _paired_coverage(0.0, _shared_seed_experiment, True)
    unpaired, unpaired_width = _paired_coverage(0.0, _shared_seed_experiment, False)
    assert paired >= 90 and unpaired >= 90 and paired_width < 0.6 * unpaired_width
    assert _paired_coverage(0.0, _experiment, True)[0] >= 90  # pairing independent seeds stays valid
    assert _paired_coverage(0.4, _shared_seed_experiment, True)[0] <= 20
    assert _paired_coverage(0.4, _shared_seed_experiment, False)[0] > 50
    a, b, documents = _shared_seed_experiment(np.random.default_rng(0), 0.4)
    d = paired_difference(a, b, documents=documents, samples=500, same_seeds=True)
    assert d.covers == "test documents and training seeds (paired by seed)" and d.seeds_paired


def test_seeds_are_matched_by_value():
    from megatron_miniplm.evaluation.compare import compare_models

    rng = np.random.default_rng(1)
    a, b, documents = _shared_seed_experiment(rng, 0.4)
    losses = {"a": a, "b": b[::-1]}
    matched = compare_models(losses, None, [], documents=documents, samples=500,
                             seeds={"a": [1, 2, 3], "b": [3, 2, 1]})["b"]["overall"]
    assert matched["seeds_paired"] and matched["low"] > 0
    unknown = compare_models(losses, None, [], documents=documents, samples=500,
                             seeds={"a": [1, 2, 3], "b": [None, None, None]})["b"]["overall"]
    assert not unknown["seeds_paired"]
