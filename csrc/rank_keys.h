// Ranking keys: doubles mapped to uint64 so that one unsigned comparison orders
// instances, and the block kernels of the selection's first pass over them.
#pragma once
#include <cstdint>
#include <cstring>

namespace miniplm {

// Monotone map of a double to uint64: a < b  <=>  order_key(a) < order_key(b),
// with -0.0 ranked equal to +0.0. NaN: see rank_key.
inline uint64_t order_key(double x) {
    x += 0.0;  // -0.0 + 0.0 == +0.0
    uint64_t u;
    std::memcpy(&u, &x, sizeof u);
    const uint64_t flip = static_cast<uint64_t>(static_cast<int64_t>(u) >> 63) | (1ULL << 63);
    return u ^ flip;
}

// The ranking key of a score: order_key, complemented when `ascending` (the lowest ranks
// first). NaN, an instance without a score (difference.h: unscored), gets key 0, which no
// other double gets: it ranks after every scored instance in either direction.
inline uint64_t rank_key(double x, bool ascending) {
    return x == x ? order_key(x) ^ (ascending ? ~0ULL : 0) : 0;
}

// keys[j] = rank_key(scores[j], ascending).
void score_keys(const double* scores, uint64_t* keys, int64_t m, bool ascending);

// Sorts m keys against the bracket [lo, lo + width], hi = lo + width: bit j % 64 of
// above[j / 64] is keys[j] > hi, of inside[j / 64] is lo <= keys[j] <= hi. Writes
// (m + 63) / 64 words to each; bits past m are 0.
void classify_keys(const uint64_t* keys, int64_t m, uint64_t lo, uint64_t width, uint64_t* above,
                   uint64_t* inside);

// Total of weights[j] over the j < m whose bit is set in words (bit j % 64 of words[j / 64]).
uint64_t masked_weight_sum(const int32_t* weights, const uint64_t* words, int64_t m);

}  // namespace miniplm
