#include "difference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

namespace miniplm {

int resolve_threads(int requested, int64_t n, int64_t min_chunk) {
    int threads = requested > 0 ? requested : static_cast<int>(std::thread::hardware_concurrency());
    threads = std::max(threads, 1);
    const int64_t useful = std::max<int64_t>(1, n / std::max<int64_t>(min_chunk, 1));
    return static_cast<int>(std::min<int64_t>(threads, useful));
}

template <typename Fn>
static void parallel_for(int64_t n, int threads, Fn fn) {
    if (threads <= 1) {
        fn(0, n);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t chunk = (n + threads - 1) / threads;
    for (int t = 0; t < threads; ++t) {
        const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
        if (begin >= end) break;
        pool.emplace_back(fn, begin, end);
    }
    for (auto& th : pool) th.join();
}

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

}  // namespace miniplm
