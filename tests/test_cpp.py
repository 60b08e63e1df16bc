"""The C++ extension builds, imports, and matches numpy."""
import numpy as np
import pytest

from megatron_miniplm import _cpp


@pytest.mark.parametrize("threads", [1, 2, 0])
def test_difference_scores_match_numpy(threads):
    rng = np.random.default_rng(0)
    n = 200_003  # odd size: uneven thread chunks
    teacher = np.stack([rng.random(n) * 500, rng.integers(0, 1025, n)], axis=1).astype(np.float64)
    reference = np.stack([rng.random(n) * 500, rng.integers(0, 1025, n)], axis=1).astype(np.float64)
    got = np.empty(n)
    bad, first = _cpp.compute_scores("difference", teacher, reference, got, num_threads=threads)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = reference[:, 0] / reference[:, 1] - teacher[:, 0] / teacher[:, 1]
    no_count = (teacher[:, 1] <= 0) | (reference[:, 1] <= 0)
    assert no_count.any()  # zero counts were drawn: the refusal path is exercised
    assert (bad, first) == (int(no_count.sum()), int(np.flatnonzero(no_count)[0]))
    np.testing.assert_array_equal(np.isnan(got), no_count)
    np.testing.assert_array_equal(got[~no_count], want[~no_count])


def test_compute_scores_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        _cpp.compute_scores("difference", np.zeros((4, 3)), np.zeros((4, 2)), np.empty(4))
    with pytest.raises(ValueError, match="rows"):
        _cpp.compute_scores("difference", np.zeros((4, 2)), np.zeros((5, 2)), np.empty(4))


def test_selection_kernels_are_exported():
    for name in ("compute_scores", "select", "gather_bytes", "order_key", "Selection"):
        assert hasattr(_cpp, name), name


def test_kernels_work_in_place_without_copies():
    big = np.zeros(10)
    scores = np.array([[2.0, 1.0], [6.0, 2.0], [1.0, 1.0]])
    _cpp.compute_scores("teacher", scores, None, big[4:7])  # a view: results land in `big`
    np.testing.assert_array_equal(big[4:7], [2.0, 3.0, 1.0])
    s = np.arange(100_000, dtype=np.float64)
    hist = _cpp.select(s, 10, bracket=False)
    one = _cpp.select(s, 10)
    assert one.bracketed
    s[:] = 0.0  # a histogram plan reads the caller's buffer again, so its writer sees the change
    with pytest.raises(RuntimeError, match="changed"):
        hist.write_indices(np.empty(10, np.int64))
    out = np.empty(10, np.int64)  # a bracketed plan wrote down what it keeps while planning
    one.write_indices(out)
    np.testing.assert_array_equal(out, np.arange(99_990, 100_000))
    with pytest.raises(TypeError, match="float64"):
        _cpp.select(np.arange(10, dtype=np.int64), 3)  # an int array would need a converted copy
