// Counter-based randomness: every random choice is a pure function of
// (seed, index), so results do not depend on the number of threads.
#pragma once
#include <cstdint>

namespace miniplm {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// SplitMix64's output function: a bijective 64-bit mixer.
inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Independent streams for different uses of one user seed.
inline uint64_t stream_seed(uint64_t seed, uint64_t stream) {
    return mix64(seed ^ mix64(stream * kGolden + 0x2545F4914F6CDD1DULL));
}

// The i-th value of the SplitMix64 sequence started at `stream`.
inline uint64_t hash64(uint64_t stream, uint64_t i) { return mix64(stream + (i + 1) * kGolden); }

struct SplitMix64 {
    uint64_t state;
    uint64_t next() { return mix64(state += kGolden); }
};

// Unbiased integer in [0, range) (Lemire's multiply-and-reject), range > 0.
inline uint64_t bounded(SplitMix64& rng, uint64_t range) {
    unsigned __int128 m = static_cast<unsigned __int128>(rng.next()) * range;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < range) {
        const uint64_t threshold = (0 - range) % range;
        while (low < threshold) {
            m = static_cast<unsigned __int128>(rng.next()) * range;
            low = static_cast<uint64_t>(m);
        }
    }
    return static_cast<uint64_t>(m >> 64);
}

}  // namespace miniplm
