// Copies byte ranges of several source buffers into one output, in row order
// (used to write selected instances as a new indexed dataset).
#pragma once
#include <cstdint>

namespace miniplm {

// Row r copies sources[shard[r]][offset[r] : offset[r] + nbytes[r]] to the next
// nbytes[r] bytes of `out`. Throws std::out_of_range naming the first bad row.
void gather_bytes(const uint8_t* const* sources, const int64_t* source_sizes, int64_t num_sources,
                  const int64_t* shard, const int64_t* offset, const int64_t* nbytes, int64_t rows,
                  uint8_t* out, int64_t out_size, int num_threads);

}  // namespace miniplm
