"""The C++ extension builds, imports, and matches numpy."""
import numpy as np
import pytest

from megatron_miniplm import _cpp


def _numpy_difference(teacher, reference):
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = reference[:, 0] / reference[:, 1] - teacher[:, 0] / teacher[:, 1]
    diff[(teacher[:, 1] <= 0) | (reference[:, 1] <= 0)] = np.nan
    return diff


@pytest.mark.parametrize("threads", [1, 2, 0])
def test_difference_scores_matches_numpy(threads):
    rng = np.random.default_rng(0)
    n = 200_003  # odd size: uneven thread chunks
    teacher = np.stack([rng.random(n) * 500, rng.integers(0, 1025, n)], axis=1).astype(np.float64)
    reference = np.stack([rng.random(n) * 500, rng.integers(0, 1025, n)], axis=1).astype(np.float64)
    got = _cpp.difference_scores(teacher, reference, num_threads=threads)
    want = _numpy_difference(teacher, reference)
    assert got.shape == (n,)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any()  # zero counts were drawn: the NaN path is exercised
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-12)


def test_difference_scores_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        _cpp.difference_scores(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="different lengths"):
        _cpp.difference_scores(np.zeros((4, 2)), np.zeros((5, 2)))
