#include "difference.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace miniplm {

namespace {

constexpr int64_t kRowBlock = 4096;  // rows scored per call of score_rows by compute_scores

template <ScoreKind kind>
MINIPLM_INLINE int64_t score_rows_impl(const double* __restrict teacher, const double* __restrict reference,
                               double* __restrict out, int64_t m) {
    int64_t bad = 0;
    for (int64_t j = 0; j < m; ++j) {
        const double v = score_of<kind>(teacher + 2 * j, reference + 2 * j);
        out[j] = v;
        bad += std::fabs(v) <= DBL_MAX ? 0 : 1;
    }
    return bad;
}

template <ScoreKind kind>
int64_t score_rows_portable(const double* teacher, const double* reference, double* out, int64_t m) {
    return score_rows_impl<kind>(teacher, reference, out, m);
}

#if MINIPLM_HAVE_AVX2_BUILD
template <ScoreKind kind>
MINIPLM_TARGET_AVX2 int64_t score_rows_avx2(const double* teacher, const double* reference, double* out, int64_t m) {
    return score_rows_impl<kind>(teacher, reference, out, m);
}
#endif

template <ScoreKind kind>
BadScores compute(const double* teacher, const double* reference, double* out, int64_t n,
                  int num_threads) {
    const auto bounds = split_range(n, resolve_threads(num_threads, n, 1 << 16));
    std::vector<BadScores> bad(bounds.size() - 1);
    run_chunks(bounds, [&](int part, int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; b += kRowBlock)
            bad[part].merge(score_rows(kind, teacher ? teacher + 2 * b : nullptr,
                                       reference ? reference + 2 * b : nullptr, out + b,
                                       std::min(kRowBlock, end - b), b));
    });
    BadScores total;
    for (const auto& b : bad) total.merge(b);  // chunks are in index order
    return total;
}

}  // namespace

BadScores score_rows(ScoreKind kind, const double* teacher, const double* reference, double* out, int64_t m,
                     int64_t index0) {
    BadScores bad;
    with_score_kind(kind, [&](auto k) {
        constexpr ScoreKind K = decltype(k)::value;
#if MINIPLM_HAVE_AVX2_BUILD
        const int64_t non_finite = use_avx2() ? score_rows_avx2<K>(teacher, reference, out, m)
                                              : score_rows_portable<K>(teacher, reference, out, m);
#else
        const int64_t non_finite = score_rows_portable<K>(teacher, reference, out, m);
#endif
        // Rare: recount the block just written (in cache), unscored rows excepted, so that
        // the hot loop above stays a plain count of non-finite scores.
        for (int64_t j = 0; non_finite && j < m; ++j) {
            if (std::isfinite(out[j]) || unscored<K>(teacher + 2 * j, reference + 2 * j)) continue;
            if (bad.first < 0) bad.first = index0 + j;
            ++bad.count;
        }
        return 0;
    });
    return bad;
}

BadScores compute_scores(ScoreKind kind, const double* teacher, const double* reference,
                         double* out, int64_t n, int num_threads) {
    return with_score_kind(kind, [&](auto k) {
        return compute<decltype(k)::value>(teacher, reference, out, n, num_threads);
    });
}

}  // namespace miniplm
