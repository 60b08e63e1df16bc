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
