#include "gather.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace miniplm {

void gather_bytes(const uint8_t* const* sources, const int64_t* source_sizes, int64_t num_sources,
                  const int64_t* shard, const int64_t* offset, const int64_t* nbytes, int64_t rows,
                  uint8_t* out, int64_t out_size, int num_threads) {
    // Validate everything before the first byte is written.
    std::vector<int64_t> dest(rows + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t s = shard[r];
        if (s < 0 || s >= num_sources || offset[r] < 0 || nbytes[r] < 0 ||
            offset[r] > source_sizes[s] - nbytes[r])
            throw std::out_of_range("gather_bytes: row " + std::to_string(r) + " (shard " +
                                    std::to_string(s) + ", offset " + std::to_string(offset[r]) +
                                    ", " + std::to_string(nbytes[r]) + " bytes) is outside its source");
        dest[r + 1] = dest[r] + nbytes[r];
    }
    if (dest[rows] != out_size)
        throw std::invalid_argument("gather_bytes: output holds " + std::to_string(out_size) +
                                    " bytes, rows need " + std::to_string(dest[rows]));
    parallel_for(rows, resolve_threads(num_threads, rows, 1 << 12), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
            std::memcpy(out + dest[r], sources[shard[r]] + offset[r], static_cast<size_t>(nbytes[r]));
    });
}

}  // namespace miniplm
