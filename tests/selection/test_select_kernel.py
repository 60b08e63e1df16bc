"""The C++ selection and blend builder against independent numpy references."""
import itertools
import math

import numpy as np
import pytest
from selection_helpers import ref_budget, ref_ranking, ref_top_k, to_pairs

from megatron_miniplm import _cpp

M64 = (1 << 64) - 1  # a capacity nothing reaches


def kept(sel) -> np.ndarray:
    out = np.empty(sel.count, np.int64)
    sel.write_indices(out)
    return out


def tied_scores(rng, n: int, distinct: int) -> np.ndarray:
    """Few distinct values (ties everywhere), signed zeros, and a wide magnitude range."""
    values = np.concatenate([[0.0, -0.0, 1e-300, -1e-300, 1e300, -1e300, 5e-324],
                             rng.standard_normal(max(distinct - 7, 1)) * 10.0 ** rng.integers(-5, 6, max(distinct - 7, 1))])
    return rng.choice(values, n)


# n up to 600K exercises the radix levels (> the 2^18 sort limit) and the many-ties path.
CASES = [(n, d) for n in (1, 2, 17, 5000, 600_001) for d in (3, 40, None)]


@pytest.mark.parametrize("n,distinct", CASES)
def test_top_k_equals_argsort_reference(n, distinct):
    rng = np.random.default_rng(n + (distinct or 0))
    scores = rng.standard_normal(n) if distinct is None else tied_scores(rng, n, distinct)
    for k in sorted({0, 1, n // 3, n - 1, n}):
        for ascending in (False, True):
            sel = _cpp.select(scores, k, ascending=ascending, num_threads=2)
            np.testing.assert_array_equal(kept(sel), ref_top_k(scores, k, ascending))
            assert sel.count == k == sel.weight


def test_all_equal_scores_keep_the_lowest_indices():
    n = 400_000  # one key value, more than the in-memory sort limit: the chunked tie path
    sel = _cpp.select(np.full(n, 2.5), 123_457, num_threads=2)
    np.testing.assert_array_equal(kept(sel), np.arange(123_457))


def test_many_ties_with_a_token_budget():
    rng = np.random.default_rng(8)
    scores = rng.choice([1.0, 2.0], 600_000)  # ~300K ties per value: the chunked tie path, weighted
    w = rng.integers(0, 1025, scores.size).astype(np.int32)
    budget = int(w[scores == 2.0].sum()) + 12_345_678
    for threads in (1, 2):
        sel = _cpp.select(scores, budget, weights=w, num_threads=threads)
        np.testing.assert_array_equal(kept(sel), ref_budget(scores, w, budget))


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_result_does_not_depend_on_threads(threads):
    rng = np.random.default_rng(5)
    scores = tied_scores(rng, 300_000, 50)
    w = rng.integers(1, 1025, scores.size).astype(np.int32)
    base = _cpp.select(scores, 1_000_000, weights=w, num_threads=1)
    sel = _cpp.select(scores, 1_000_000, weights=w, num_threads=threads)
    np.testing.assert_array_equal(kept(sel), kept(base))
    offs = np.array([0, 1000, 1000, 250_000, 300_000], np.int64)
    a, b = np.empty((sel.count, 2), np.int64), np.empty((sel.count, 2), np.int64)
    base.write_blend(a, offs, shuffle_seed=9, num_threads=1)
    sel.write_blend(b, offs, shuffle_seed=9, num_threads=threads)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,distinct", [(1000, 5), (300_000, 4), (300_000, None)])
def test_budget_keeps_the_longest_fitting_prefix(n, distinct):
    rng = np.random.default_rng(7)
    scores = rng.standard_normal(n) if distinct is None else tied_scores(rng, n, distinct)
    w = rng.integers(1, 1025, n).astype(np.int32)
    w[rng.random(n) < 0.01] = 0  # zero-length instances must not break the prefix rule
    total = int(w.sum(dtype=np.int64))
    for budget in (0, 1, 700, total // 3, total - 1, total):
        for ascending in (False, True):
            sel = _cpp.select(scores, budget, weights=w, ascending=ascending, num_threads=2)
            got = kept(sel)
            np.testing.assert_array_equal(got, ref_budget(scores, w, budget, ascending))
            tokens = int(w[got].sum(dtype=np.int64))
            assert sel.weight == tokens == sel.kept_weight(w) and tokens <= budget
            order = ref_ranking(scores, ascending)
            if got.size < n:  # the next instance in the ranking would not have fit
                assert tokens + int(w[order[got.size]]) > budget


def test_kept_weight_in_count_mode():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal(50_000)
    w = rng.integers(1, 100, scores.size).astype(np.int32)
    sel = _cpp.select(scores, 12_345)
    assert sel.kept_weight(w) == int(w[ref_top_k(scores, 12_345)].sum())


def splitmix_keys(seed: int, n: int) -> np.ndarray:
    """numpy re-statement of the uniform baseline's ranking keys (SplitMix64 of (seed, i))."""
    g = np.uint64(0x9E3779B97F4A7C15)

    def mix(z):
        z = np.asarray(z, dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):
        stream = mix(np.uint64(seed) ^ mix(np.uint64(1) * g + np.uint64(0x2545F4914F6CDD1D)))
        return mix(stream + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * g)


def test_uniform_baseline_ranks_by_seeded_random_keys():
    n, k = 200_000, 50_000
    keys = splitmix_keys(42, n)
    order = np.lexsort((np.arange(n), ~keys))  # largest key first, ties by lower index
    got = kept(_cpp.select(None, k, random_seed=42, n=n, num_threads=2))
    np.testing.assert_array_equal(got, np.sort(order[:k]))
    other = kept(_cpp.select(None, k, random_seed=43, n=n))
    assert not np.array_equal(got, other)
    # roughly uniform: each tenth of the corpus keeps about a quarter
    per_tenth = np.bincount(got * 10 // n, minlength=10) / (n / 10)
    assert np.all(np.abs(per_tenth - 0.25) < 0.02)
    # the budget mode walks the same random ranking
    w = (np.arange(n) % 7 + 1).astype(np.int32)
    fit = np.searchsorted(np.cumsum(w[order]), 100_000, side="right")
    np.testing.assert_array_equal(kept(_cpp.select(None, 100_000, weights=w, random_seed=42, n=n)),
                                  np.sort(order[:fit]))


def test_blend_original_order_is_pairs_of_sorted_indices():
    rng = np.random.default_rng(11)
    scores = tied_scores(rng, 100_000, 30)
    offs = np.array([0, 0, 31_000, 31_001, 31_001, 100_000], np.int64)  # empty shards included
    sel = _cpp.select(scores, 40_000, num_threads=2)
    out = np.empty((sel.count, 2), np.int64)
    sel.write_blend(out, offs)
    np.testing.assert_array_equal(out, to_pairs(ref_top_k(scores, 40_000), offs))


def test_shuffled_blend_is_a_seeded_permutation():
    rng = np.random.default_rng(12)
    n = 200_000
    scores = rng.standard_normal(n)
    offs = np.array([0, 50_000, 120_000, n], np.int64)
    sel = _cpp.select(scores, 150_000)
    base = np.empty((sel.count, 2), np.int64)
    sel.write_blend(base, offs)
    shuffled = {}
    for seed in (1, 1, 2):
        out = np.empty_like(base)
        sel.write_blend(out, offs, shuffle_seed=seed, num_threads=2)
        if seed in shuffled:
            np.testing.assert_array_equal(out, shuffled[seed])  # reproducible from the seed
        shuffled[seed] = out
        assert not np.array_equal(out, base)
        order = np.lexsort((out[:, 1], out[:, 0]))
        np.testing.assert_array_equal(out[order], base)  # a permutation of the kept set
    assert not np.array_equal(shuffled[1], shuffled[2])
    # no structure left: where each original position lands is uncorrelated with it
    g = offs[shuffled[1][:, 0]] + shuffled[1][:, 1]
    rank = np.searchsorted(ref_top_k(scores, 150_000), g)
    assert abs(np.corrcoef(rank, np.arange(rank.size))[0, 1]) < 0.01
    first_tenth = np.bincount(rank[: rank.size // 10] * 10 // rank.size, minlength=10)
    assert first_tenth.min() > 0.8 * first_tenth.mean()


def test_small_shuffle_is_uniform_over_permutations():
    perms = {p: 0 for p in itertools.permutations(range(4))}
    offs = np.array([0, 4], np.int64)
    sel = _cpp.select(np.arange(4.0), 4)
    out = np.empty((4, 2), np.int64)
    trials = 4800
    for seed in range(trials):
        sel.write_blend(out, offs, shuffle_seed=seed)
        perms[tuple(out[:, 1])] += 1
    expected = trials / 24
    chi2 = sum((c - expected) ** 2 / expected for c in perms.values())
    assert chi2 < 60, chi2  # 23 degrees of freedom: p ~ 4e-5 at 60


def test_order_key_is_monotone_and_merges_signed_zeros():
    xs = [-np.inf, -1e300, -2.5, -1e-300, -5e-324, -0.0, 0.0, 5e-324, 1e-300, 1.0, 1e300, np.inf]
    keys = [_cpp.order_key(x) for x in xs]
    assert keys[5] == keys[6]  # -0.0 ranks with +0.0
    distinct = keys[:6] + keys[7:]
    assert all(a < b for a, b in zip(distinct, distinct[1:]))


def test_refuses_copies_and_bad_inputs():
    with pytest.raises(TypeError, match="float64"):
        _cpp.select(np.zeros(10, np.float32), 3)  # would need a converted copy
    with pytest.raises(TypeError, match="C-contiguous"):
        _cpp.select(np.zeros(20)[::2], 3)
    with pytest.raises(ValueError, match="negative weight"):
        _cpp.select(np.zeros(3), 3, weights=np.array([1, -1, 2], np.int32))
    big = np.ones(3_000_001, np.int32)  # checked in parallel chunks: the first one is named
    big[[2_999_999, 2_500_000, 1_600_003]] = [-1, -7, np.iinfo(np.int32).min]
    rows = np.ones((big.size, 2))
    for call in (lambda: _cpp.select(np.zeros(big.size), 3, weights=big, num_threads=2),
                 lambda: _cpp.select_scored("teacher", [rows], None, np.array([0, big.size], np.int64), None, 3,
                                            weights=big, num_threads=2),
                 lambda: _cpp.select(np.zeros(big.size), 3).kept_weight(big)):
        with pytest.raises(ValueError, match="instance 1600003 has a negative weight"):
            call()
    with pytest.raises(ValueError, match="rows"):
        _cpp.select(np.zeros(3), 3, weights=np.ones(4, np.int32))
    sel = _cpp.select(np.arange(10.0), 4)
    with pytest.raises(ValueError, match="rows"):
        sel.write_blend(np.empty((5, 2), np.int64), np.array([0, 10], np.int64))
    with pytest.raises(ValueError, match="shard_offsets"):
        sel.write_blend(np.empty((4, 2), np.int64), np.array([0, 9], np.int64))
    ro = np.empty((4, 2), np.int64)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        sel.write_blend(ro, np.array([0, 10], np.int64))


def test_compute_scores_matches_numpy_and_flags_bad_rows():
    rng = np.random.default_rng(2)
    n = 100_003
    t = np.stack([rng.random(n) * 900, rng.integers(1, 1025, n)], 1).astype(np.float64)
    r = np.stack([rng.random(n) * 900, rng.integers(1, 1025, n)], 1).astype(np.float64)
    for kind, want in (("difference", r[:, 0] / r[:, 1] - t[:, 0] / t[:, 1]), ("teacher", t[:, 0] / t[:, 1]),
                       ("reference", r[:, 0] / r[:, 1])):
        out = np.empty(n)
        assert _cpp.compute_scores(kind, t, r, out, num_threads=2) == (0, -1)
        np.testing.assert_array_equal(out, want)
    t[70_001, 0] = np.nan
    t[90_000, 1] = 0
    r[80_000, 0] = np.inf
    out = np.empty(n)
    assert _cpp.compute_scores("difference", t, r, out, num_threads=2) == (3, 70_001)
    assert _cpp.compute_scores("reference", None, r, out) == (1, 80_000)
    assert _cpp.compute_scores("teacher", t, None, out) == (2, 70_001)


def test_gather_bytes_copies_rows_and_checks_bounds():
    rng = np.random.default_rng(4)
    srcs = [rng.integers(0, 256, 1000, dtype=np.uint8), rng.integers(0, 256, 10, dtype=np.uint8)]
    shard = np.array([1, 0, 0, 1], np.int64)
    offset = np.array([2, 990, 0, 0], np.int64)
    nbytes = np.array([8, 10, 0, 1], np.int64)
    out = np.empty(19, np.uint8)
    _cpp.gather_bytes(srcs, shard, offset, nbytes, out)
    np.testing.assert_array_equal(out, np.concatenate([srcs[1][2:10], srcs[0][990:1000], srcs[1][:1]]))
    with pytest.raises(IndexError, match="row 1"):
        _cpp.gather_bytes(srcs, shard, np.array([2, 991, 0, 0], np.int64), nbytes, out)


def test_capacity_beyond_everything_keeps_all():
    scores = np.random.default_rng(0).standard_normal(300_000)
    sel = _cpp.select(scores, M64)
    assert sel.count == scores.size
    np.testing.assert_array_equal(kept(sel), np.arange(scores.size))
    assert math.isfinite(scores.sum())


@pytest.mark.parametrize("n", [1000, 700_001])  # the small path scores first; the large one fuses
@pytest.mark.parametrize("kind,ascending", [("difference", False), ("teacher", True), ("reference", False)])
def test_select_scored_equals_compute_then_select(n, kind, ascending):
    rng = np.random.default_rng(n)
    offs = np.array([0, n // 3, n // 3, n], np.int64)  # an empty shard in the middle
    count = rng.integers(1, 1025, n).astype(np.float64)
    t = np.stack([rng.choice([1.0, 2.0, 3.0], n) * count, count], 1)
    r = np.stack([rng.choice([2.0, 2.5, 3.0, 4.0], n) * count, count], 1)
    ts = [t[offs[s]:offs[s + 1]] for s in range(3)]
    rs = [r[offs[s]:offs[s + 1]] for s in range(3)]
    w = rng.integers(1, 1025, n).astype(np.int32)
    want = np.empty(n)
    _cpp.compute_scores(kind, t, r, want)
    for weights, cap in ((None, n // 4), (w, int(w.sum()) // 3)):
        out = np.empty(n)
        sel, bad, first = _cpp.select_scored(kind, ts, rs, offs, out, cap, weights=weights, ascending=ascending,
                                             num_threads=2)
        assert (bad, first) == (0, -1)
        np.testing.assert_array_equal(out, want)
        ref = ref_top_k(want, cap, ascending) if weights is None else ref_budget(want, w, cap, ascending)
        np.testing.assert_array_equal(kept(sel), ref)
        blend = np.empty((sel.count, 2), np.int64)
        tokens = sel.write_blend(blend, offs, weights=w)
        np.testing.assert_array_equal(blend, to_pairs(ref, offs))
        assert tokens == int(w[ref].sum())
        shuffled = np.empty_like(blend)
        assert sel.write_blend(shuffled, offs, shuffle_seed=3, weights=w) == tokens
        lean, _, _ = _cpp.select_scored(kind, ts, rs, offs, None, cap, weights=weights, ascending=ascending,
                                        num_threads=2)
        np.testing.assert_array_equal(kept(lean), ref)
    t[n - 2, 1] = 0.0
    r[n // 2, 0] = np.nan
    sel, bad, first = _cpp.select_scored(kind, ts, rs, offs, np.empty(n), 10, ascending=ascending)
    expect = {"difference": (2, n // 2), "teacher": (1, n - 2), "reference": (1, n // 2)}[kind]
    assert sel is None and (bad, first) == expect


@pytest.mark.parametrize("n", [1000, 700_001])  # the small path scores first; the large one fuses
@pytest.mark.parametrize("kind,ascending", [("difference", False), ("difference", True), ("teacher", True),
                                            ("reference", False)])
def test_unscored_rows_rank_last_and_other_bad_rows_are_refused(n, kind, ascending):
    """A (0, 0) row (an instance with no counted prediction) scores NaN and ranks after every
    scored instance in either direction, ties by index, on the bracket and histogram paths,
    by count and by tokens; a count of 0 beside a nonzero sum, or in one file only, is refused."""
    rng = np.random.default_rng(n + len(kind))
    offs = np.array([0, n // 2, n], np.int64)
    count = rng.integers(1, 1025, n).astype(np.float64)
    t = np.stack([rng.choice([1.0, 2.0, 3.0], n) * count, count], 1)
    r = np.stack([rng.choice([2.0, 2.5, 3.0, 4.0], n) * count, count], 1)
    none = np.sort(rng.choice(n, n // 10, replace=False))
    t[none] = r[none] = 0.0
    ts, rs = [t[:n // 2], t[n // 2:]], [r[:n // 2], r[n // 2:]]
    want = np.empty(n)
    assert _cpp.compute_scores(kind, t, r, want) == (0, -1)
    assert np.isnan(want[none]).all() and np.isfinite(np.delete(want, none)).all()
    scored = np.delete(np.arange(n), none)
    order = np.concatenate([scored[ref_ranking(want[scored], ascending)], none])  # unscored last, by index
    w = rng.integers(1, 1025, n).astype(np.int32)
    past = int(w[scored].sum()) + int(w[none[:3]].sum())  # a budget reaching 3 unscored instances in
    for weights, cap, k in ((None, n // 4, n // 4), (None, n - len(none) // 2, n - len(none) // 2),
                            (w, past, scored.size + 3)):
        for bracket in (True, False):
            for out in (np.empty(n), None):
                sel, bad, _ = _cpp.select_scored(kind, ts, rs, offs, out, cap, weights=weights, ascending=ascending,
                                                 num_threads=2, bracket=bracket)
                assert bad == 0
                np.testing.assert_array_equal(kept(sel), np.sort(order[:k]))
            plain = _cpp.select(want, cap, weights=weights, ascending=ascending, num_threads=2, bracket=bracket)
            np.testing.assert_array_equal(kept(plain), np.sort(order[:k]))
    read = r if kind == "reference" else t
    read[none[1], 0] = 1.0  # a count of 0 with a nonzero sum
    if kind == "difference":
        r[none[0]] = [2.0, 1.0]  # (0, 0) in the teacher's file only
    sel, bad, first = _cpp.select_scored(kind, ts, rs, offs, None, n // 4, ascending=ascending)
    assert sel is None and (bad, first) == ((2, none[0]) if kind == "difference" else (1, none[1]))


# --- the sampled bracket (one pass) and its fallback to histogram passes -----------------

@pytest.mark.parametrize("n,distinct", [(5000, None), (300_000, None), (300_000, 40), (600_001, 3)])
def test_bracket_and_histogram_paths_agree(n, distinct):
    rng = np.random.default_rng(n + 11 * (distinct or 1))
    scores = rng.standard_normal(n) if distinct is None else tied_scores(rng, n, distinct)
    w = rng.integers(0, 1025, n).astype(np.int32)
    total = int(w.sum(dtype=np.int64))
    desc_key = np.array([_cpp.order_key(x) for x in scores], np.uint64)
    bracketed = []
    for weights, caps in ((None, (0, 1, n // 50, n // 2, n - 1)), (w, (0, 700, total // 7, total // 2, total - 1))):
        for cap in caps:
            for ascending in (False, True):
                ref = ref_top_k(scores, cap, ascending) if weights is None else ref_budget(scores, w, cap, ascending)
                one = _cpp.select(scores, cap, weights=weights, ascending=ascending, num_threads=2)
                hist = _cpp.select(scores, cap, weights=weights, ascending=ascending, num_threads=2, bracket=False)
                assert not hist.bracketed
                bracketed.append(one.bracketed)
                np.testing.assert_array_equal(kept(one), ref)
                np.testing.assert_array_equal(kept(hist), ref)
                assert (one.count, one.weight) == (hist.count, hist.weight)
                # the boundary means the same thing whichever path found it
                key = ~desc_key if ascending else desc_key
                bk, bi = np.uint64(one.boundary_key), one.boundary_index
                np.testing.assert_array_equal(np.flatnonzero((key > bk) | ((key == bk) & (np.arange(n) <= bi))), ref)
                if one.bracketed:
                    assert one.passes == 1
                    offs = np.array([0, n // 3, n], np.int64)
                    a, b = np.empty((one.count, 2), np.int64), np.empty((one.count, 2), np.int64)
                    assert one.write_blend(a, offs, weights=w) == hist.write_blend(b, offs, weights=w)
                    np.testing.assert_array_equal(a, b)
                    one.write_blend(a, offs, shuffle_seed=5)
                    hist.write_blend(b, offs, shuffle_seed=5)
                    np.testing.assert_array_equal(a, b)
    if distinct is None and n >= 300_000:  # continuous scores: the bracket is the path taken
        assert sum(bracketed) >= len(bracketed) - 4, bracketed


def test_bracket_misses_fall_back_to_histograms():
    rng = np.random.default_rng(21)
    n = 300_000
    scores = rng.standard_normal(n)
    # Almost all the weight in a few instances: the sample cannot place the token boundary.
    missed = 0
    for heavy in (5, 40, 400):
        w = np.zeros(n, np.int32)
        w[rng.choice(n, heavy, replace=False)] = 1_000_000
        for budget in (1_500_000, 5_000_000, 20_000_000):
            sel = _cpp.select(scores, budget, weights=w, num_threads=2)
            np.testing.assert_array_equal(kept(sel), ref_budget(scores, w, budget))
            missed += not sel.bracketed and sel.passes >= 2  # a bracket pass, then histograms
    assert missed >= 3
    # One key value everywhere: the bracket holds everything and overflows.
    sel = _cpp.select(np.full(400_000, 2.5), 123_457, num_threads=2)
    assert not sel.bracketed and sel.passes >= 2


def test_fused_scoring_bracket_and_its_fallback():
    rng = np.random.default_rng(4)
    n = 700_001  # above the sort limit: scores are computed in the bracket pass itself
    offs = np.array([0, 250_000, n], np.int64)
    count = rng.integers(1, 1025, n).astype(np.float64)
    t = np.stack([rng.normal(3.0, 0.6, n) * count, count], 1)
    r = np.stack([(t[:, 0] / count + rng.normal(0.8, 0.4, n)) * count, count], 1)
    ts, rs = [t[:250_000], t[250_000:]], [r[:250_000], r[250_000:]]
    want = np.empty(n)
    _cpp.compute_scores("difference", t, r, want)
    heavy = np.zeros(n, np.int32)
    heavy[rng.choice(n, 40, replace=False)] = 1_000_000
    for weights, cap, bracketed in ((None, n // 2, True), (heavy, 20_000_000, False)):
        out = np.empty(n)
        sel, bad, _ = _cpp.select_scored("difference", ts, rs, offs, out, cap, weights=weights, num_threads=2)
        assert bad == 0 and sel.bracketed == bracketed
        np.testing.assert_array_equal(out, want)  # complete even when the bracket missed
        ref = ref_top_k(want, cap, False) if weights is None else ref_budget(want, heavy, cap)
        np.testing.assert_array_equal(kept(sel), ref)
        # Keeping no scores (out=None): the same selection and blend, bracketed or not.
        for bracket in (True, False):
            lean, bad, _ = _cpp.select_scored("difference", ts, rs, offs, None, cap, weights=weights,
                                              num_threads=2, bracket=bracket)
            assert bad == 0 and lean.bracketed == (bracket and bracketed)
            np.testing.assert_array_equal(kept(lean), ref)
            a, b = np.empty((lean.count, 2), np.int64), np.empty((sel.count, 2), np.int64)
            lean.write_blend(a, offs, shuffle_seed=2)
            sel.write_blend(b, offs, shuffle_seed=2)
            np.testing.assert_array_equal(a, b)
    t[123_456, 0] = np.inf  # a bad score is still found by the bracket pass
    for out in (np.empty(n), None):
        sel, bad, first = _cpp.select_scored("difference", ts, rs, offs, out, n // 2, num_threads=2)
        assert sel is None and (bad, first) == (1, 123_456)
