// Difference Sampling kernels: pure C++ on raw buffers, no Python types.
#pragma once
#include <cstdint>

namespace miniplm {

// Number of worker threads to use for `n` items: `requested` if positive,
// else the hardware concurrency, never more than one thread per `min_chunk` items.
int resolve_threads(int requested, int64_t n, int64_t min_chunk);

// difference[i] = ref_sum[i] / ref_count[i] - teacher_sum[i] / teacher_count[i].
// Score rows are (nll_sum, token_count) pairs, `stride` doubles apart.
// An instance with no counted token in either file gets NaN.
void difference_scores(const double* teacher, const double* reference, double* out,
                       int64_t n, int64_t stride, int num_threads);

}  // namespace miniplm
