#include "rank_keys.h"

#include "simd.h"

#if MINIPLM_HAVE_AVX2_BUILD
#include <immintrin.h>
#endif

namespace miniplm {
namespace {

void score_keys_portable(const double* scores, uint64_t* keys, int64_t m, bool ascending) {
    for (int64_t j = 0; j < m; ++j) keys[j] = rank_key(scores[j], ascending);
}

void classify_keys_portable(const uint64_t* keys, int64_t m, uint64_t lo, uint64_t width, uint64_t* above,
                            uint64_t* inside) {
    const uint64_t hi = lo + width;
    for (int64_t w = 0; 64 * w < m; ++w) {
        uint64_t a = 0, in = 0;
        const int64_t end = m - 64 * w < 64 ? m - 64 * w : 64;
        for (int64_t j = 0; j < end; ++j) {
            const uint64_t k = keys[64 * w + j];
            a |= static_cast<uint64_t>(k > hi) << j;
            in |= static_cast<uint64_t>(k - lo <= width) << j;
        }
        above[w] = a;
        inside[w] = in;
    }
}

uint64_t masked_weight_sum_portable(const int32_t* weights, const uint64_t* words, int64_t m) {
    uint64_t total = 0;
    for (int64_t j = 0; j < m; ++j)
        total += static_cast<uint64_t>(static_cast<uint32_t>(weights[j])) & (0 - ((words[j >> 6] >> (j & 63)) & 1));
    return total;
}

#if MINIPLM_HAVE_AVX2_BUILD
// AVX2 has only signed 64-bit comparisons: x >u y  <=>  (x ^ 2^63) >s (y ^ 2^63).
MINIPLM_TARGET_AVX2 void score_keys_avx2(const double* scores, uint64_t* keys, int64_t m, bool ascending) {
    const __m256i sign = _mm256_set1_epi64x(INT64_MIN);
    const __m256i flip_all = _mm256_set1_epi64x(ascending ? -1 : 0);
    const __m256i zero = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
        const __m256d x = _mm256_add_pd(_mm256_loadu_pd(scores + j), _mm256_setzero_pd());
        const __m256i u = _mm256_castpd_si256(x);
        const __m256i negative = _mm256_cmpgt_epi64(zero, u);
        const __m256i k = _mm256_xor_si256(u, _mm256_or_si256(negative, sign));
        const __m256i ordered = _mm256_castpd_si256(_mm256_cmp_pd(x, x, _CMP_ORD_Q));  // 0 where NaN
        const __m256i key = _mm256_and_si256(_mm256_xor_si256(k, flip_all), ordered);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + j), key);
    }
    for (; j < m; ++j) keys[j] = rank_key(scores[j], ascending);
}

MINIPLM_TARGET_AVX2 void classify_keys_avx2(const uint64_t* keys, int64_t m, uint64_t lo, uint64_t width,
                                            uint64_t* above, uint64_t* inside) {
    const __m256i sign = _mm256_set1_epi64x(INT64_MIN);
    const __m256i hi_s = _mm256_set1_epi64x(static_cast<int64_t>((lo + width) ^ (1ULL << 63)));
    const __m256i width_s = _mm256_set1_epi64x(static_cast<int64_t>(width ^ (1ULL << 63)));
    const __m256i lo_v = _mm256_set1_epi64x(static_cast<int64_t>(lo));
    int64_t w = 0;
    for (; 64 * w + 64 <= m; ++w) {
        uint64_t a = 0, out = 0;
        const uint64_t* k = keys + 64 * w;
        for (int q = 0; q < 16; ++q) {
            const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 4 * q));
            const __m256i gt = _mm256_cmpgt_epi64(_mm256_xor_si256(x, sign), hi_s);
            const __m256i past = _mm256_cmpgt_epi64(_mm256_xor_si256(_mm256_sub_epi64(x, lo_v), sign), width_s);
            a |= static_cast<uint64_t>(_mm256_movemask_pd(_mm256_castsi256_pd(gt))) << (4 * q);
            out |= static_cast<uint64_t>(_mm256_movemask_pd(_mm256_castsi256_pd(past))) << (4 * q);
        }
        above[w] = a;
        inside[w] = ~out;
    }
    if (64 * w < m) classify_keys_portable(keys + 64 * w, m - 64 * w, lo, width, above + w, inside + w);
}

// 4 weights at a time: their 4 mask bits become 4 all-ones/all-zeros 64-bit lanes.
MINIPLM_TARGET_AVX2 uint64_t masked_weight_sum_avx2(const int32_t* weights, const uint64_t* words, int64_t m) {
    const __m256i lane_bit = _mm256_set_epi64x(8, 4, 2, 1);
    __m256i acc = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
        const int64_t nibble = static_cast<int64_t>((words[j >> 6] >> (j & 63)) & 15);
        const __m256i bits = _mm256_and_si256(_mm256_set1_epi64x(nibble), lane_bit);
        const __m256i mask = _mm256_cmpeq_epi64(bits, lane_bit);
        const __m256i w = _mm256_cvtepu32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weights + j)));
        acc = _mm256_add_epi64(acc, _mm256_and_si256(w, mask));
    }
    alignas(32) uint64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    const uint64_t head = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    if (j == m) return head;
    // the tail: words[j >> 6] shifted so that bit 0 is instance j
    uint64_t tail = 0;
    for (; j < m; ++j)
        tail += static_cast<uint64_t>(static_cast<uint32_t>(weights[j])) & (0 - ((words[j >> 6] >> (j & 63)) & 1));
    return head + tail;
}
#endif

}  // namespace

uint64_t masked_weight_sum(const int32_t* weights, const uint64_t* words, int64_t m) {
#if MINIPLM_HAVE_AVX2_BUILD
    if (use_avx2()) return masked_weight_sum_avx2(weights, words, m);
#endif
    return masked_weight_sum_portable(weights, words, m);
}

void score_keys(const double* scores, uint64_t* keys, int64_t m, bool ascending) {
#if MINIPLM_HAVE_AVX2_BUILD
    if (use_avx2()) return score_keys_avx2(scores, keys, m, ascending);
#endif
    score_keys_portable(scores, keys, m, ascending);
}

void classify_keys(const uint64_t* keys, int64_t m, uint64_t lo, uint64_t width, uint64_t* above,
                   uint64_t* inside) {
#if MINIPLM_HAVE_AVX2_BUILD
    if (use_avx2()) return classify_keys_avx2(keys, m, lo, width, above, inside);
#endif
    classify_keys_portable(keys, m, lo, width, above, inside);
}

}  // namespace miniplm
