#include "difference.h"

#include <cmath>
#include <limits>
#include <vector>

namespace miniplm {

void difference_scores(const double* teacher, const double* reference, double* out,
                       int64_t n, int64_t stride, int num_threads) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    parallel_for(n, resolve_threads(num_threads, n, 1 << 16), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const double* t = teacher + i * stride;
            const double* r = reference + i * stride;
            out[i] = (t[1] > 0 && r[1] > 0) ? r[0] / r[1] - t[0] / t[1] : nan;
        }
    });
}

namespace {

template <ScoreKind kind>
BadScores compute(const double* teacher, const double* reference, double* out, int64_t n,
                  int num_threads) {
    const auto bounds = split_range(n, resolve_threads(num_threads, n, 1 << 16));
    std::vector<BadScores> bad(bounds.size() - 1);
    run_chunks(bounds, [&](int part, int64_t begin, int64_t end) {
        int64_t count = 0, first = -1;
        for (int64_t i = begin; i < end; ++i) {
            const double v = score_of<kind>(teacher + 2 * i, reference + 2 * i);
            out[i] = v;
            if (!std::isfinite(v)) {
                if (first < 0) first = i;
                ++count;
            }
        }
        bad[part] = {count, first};
    });
    BadScores total;
    for (const auto& b : bad) {  // chunks are in index order: the first hit is the lowest index
        if (b.count && total.first < 0) total.first = b.first;
        total.count += b.count;
    }
    return total;
}

}  // namespace

BadScores compute_scores(ScoreKind kind, const double* teacher, const double* reference,
                         double* out, int64_t n, int num_threads) {
    return with_score_kind(kind, [&](auto k) {
        return compute<decltype(k)::value>(teacher, reference, out, n, num_threads);
    });
}

}  // namespace miniplm
