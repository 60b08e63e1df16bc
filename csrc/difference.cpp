#include "difference.h"

#include <cmath>
#include <vector>

namespace miniplm {

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
