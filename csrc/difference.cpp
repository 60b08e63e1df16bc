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
    const int64_t count = with_score_kind(kind, [&](auto k) {
        constexpr ScoreKind K = decltype(k)::value;
#if MINIPLM_HAVE_AVX2_BUILD
        if (use_avx2()) return score_rows_avx2<K>(teacher, reference, out, m);
#endif
        return score_rows_portable<K>(teacher, reference, out, m);
    });
    BadScores bad;
    if (count) {  // rare: find the first in the block just written (in cache)
        bad.count = count;
        for (int64_t j = 0; bad.first < 0; ++j)
            if (!std::isfinite(out[j])) bad.first = index0 + j;
    }
    return bad;
}

BadScores compute_scores(ScoreKind kind, const double* teacher, const double* reference,
                         double* out, int64_t n, int num_threads) {
    return with_score_kind(kind, [&](auto k) {
        return compute<decltype(k)::value>(teacher, reference, out, n, num_threads);
    });
}

}  // namespace miniplm
