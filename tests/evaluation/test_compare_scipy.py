"""The paired comparison's seed part against scipy's t tests, an independent implementation.

When every test instance shows the same difference, the test set adds nothing to the
interval (its bootstrap variance is zero) and what remains is a t interval over training
seeds: with runs paired by seed, scipy's paired t test (``ttest_rel``) over the per-seed
mean losses; with independent seeds, Welch's test (``ttest_ind(equal_var=False)``).
"""

import numpy as np
import pytest
from scipy import stats

from megatron_miniplm.evaluation.compare import paired_difference, t_quantile

INSTANCES = 40


def _runs(offsets, base):
    """Per-seed losses over one test set: the same per-instance difficulties, shifted by a
    per-run offset, so a difference of two runs is the same on every instance."""
    return [base + o for o in offsets]


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_paired_by_seed_is_scipys_paired_t_interval(seeds):
    rng = np.random.default_rng(seeds)
    base = rng.normal(6.0, 1.0, INSTANCES)
    a_off, b_off = rng.normal(0.1, 0.3, seeds), rng.normal(0.0, 0.3, seeds)
    documents = np.repeat(np.arange(INSTANCES // 4), 4)
    ours = paired_difference(_runs(a_off, base), _runs(b_off, base), documents=documents,
                             same_seeds=True, samples=2000)
    want = stats.ttest_rel(base.mean() + a_off, base.mean() + b_off).confidence_interval(0.95)
    assert ours.seeds_paired
    assert ours.mean == pytest.approx((a_off - b_off).mean(), abs=1e-12)
    assert (ours.low, ours.high) == pytest.approx((want.low, want.high), abs=2e-3)


@pytest.mark.parametrize("seeds", [(2, 2), (3, 4), (5, 3)])
def test_independent_seeds_are_welchs_interval(seeds):
    rng = np.random.default_rng(sum(seeds))
    base = rng.normal(6.0, 1.0, INSTANCES)
    a_off, b_off = rng.normal(0.1, 0.3, seeds[0]), rng.normal(0.0, 0.2, seeds[1])
    ours = paired_difference(_runs(a_off, base), _runs(b_off, base), samples=2000)
    want = stats.ttest_ind(base.mean() + a_off, base.mean() + b_off,
                           equal_var=False).confidence_interval(0.95)
    assert not ours.seeds_paired
    assert (ours.low, ours.high) == pytest.approx((want.low, want.high), abs=2e-3)


@pytest.mark.parametrize("df", [1, 2, 3.7, 9, 30, 250])
def test_t_quantile_is_scipys(df):
    for p in (0.9, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=2e-3)
