// Minimal fork-join helpers over contiguous index ranges (std::thread, no pool).
// Work is split into fixed chunks so that per-chunk results can be combined in
// chunk order: results never depend on scheduling, only on the chunk bounds.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace miniplm {

// Number of worker threads to use for `n` items: `requested` if positive,
// else the hardware concurrency, never more than one thread per `min_chunk` items.
inline int resolve_threads(int requested, int64_t n, int64_t min_chunk) {
    int threads = requested > 0 ? requested : static_cast<int>(std::thread::hardware_concurrency());
    threads = std::max(threads, 1);
    const int64_t useful = std::max<int64_t>(1, n / std::max<int64_t>(min_chunk, 1));
    return static_cast<int>(std::min<int64_t>(threads, useful));
}

// `parts + 1` ascending bounds splitting [0, n) into `parts` near-equal ranges.
inline std::vector<int64_t> split_range(int64_t n, int parts) {
    parts = std::max(parts, 1);
    std::vector<int64_t> bounds(parts + 1);
    for (int p = 0; p <= parts; ++p)
        bounds[p] = static_cast<int64_t>((static_cast<unsigned __int128>(n) * p) / parts);
    return bounds;
}

// Runs fn(part, begin, end) for every range of `bounds`, one thread per range.
// An exception thrown by a worker is rethrown in the caller after all joined.
template <typename Fn>
void run_chunks(const std::vector<int64_t>& bounds, Fn fn) {
    const int parts = static_cast<int>(bounds.size()) - 1;
    if (parts <= 1) {
        if (parts == 1) fn(0, bounds[0], bounds[1]);
        return;
    }
    std::vector<std::exception_ptr> errors(parts);
    std::vector<std::thread> pool;
    pool.reserve(parts - 1);
    auto body = [&](int p) {
        try {
            fn(p, bounds[p], bounds[p + 1]);
        } catch (...) {
            errors[p] = std::current_exception();
        }
    };
    for (int p = 1; p < parts; ++p) pool.emplace_back(body, p);
    body(0);  // the calling thread takes the first range
    for (auto& th : pool) th.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

// fn(begin, end) over `threads` near-equal ranges of [0, n).
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn fn) {
    run_chunks(split_range(n, std::max(threads, 1)),
               [&](int, int64_t begin, int64_t end) { fn(begin, end); });
}

}  // namespace miniplm
