#include "select.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "parallel.h"
#include "random.h"

namespace miniplm {
namespace {

constexpr int kRadixBits = 16;                // buckets per histogram level
constexpr int64_t kBuckets = 1LL << kRadixBits;
constexpr int64_t kSortLimit = 1LL << 18;     // a boundary bucket this small is sorted in memory
constexpr int64_t kMinChunk = 1LL << 16;      // fewer items per thread do not pay for a thread
constexpr int kShuffleBucketBits = 15;        // ~32K rows per shuffle bucket: fits in L2
constexpr uint64_t kStreamKeys = 1, kStreamBucket = 2, kStreamShuffle = 3, kStreamSample = 4;
// The sampled bracket: blocks of consecutive keys (a cache line each) at hashed positions.
constexpr int64_t kSampleBlocks = 32768, kSampleBlock = 8;
constexpr double kBracketSigmas = 4.0;     // half-width of the bracket, in binomial std devs
constexpr double kMaxInside = 1.0 / 16;    // a wider bracket is not worth a pass: histograms
constexpr int64_t kKeyBlock = 512;         // keys made per block of a first pass: whole words, in L1

// Key sources: the ranking key of instance i (larger ranks first).
struct DescKeys {
    const double* s;
    uint64_t operator()(int64_t i) const { return rank_key(s[i], false); }
};
struct AscKeys {
    const double* s;
    uint64_t operator()(int64_t i) const { return rank_key(s[i], true); }
};
struct RandomKeys {
    uint64_t stream;
    uint64_t operator()(int64_t i) const { return hash64(stream, static_cast<uint64_t>(i)); }
};

// Weights: what the capacity counts.
struct UnitWeight {
    static constexpr bool unit = true;
    uint64_t operator()(int64_t) const { return 1; }
};
struct TokenWeight {
    static constexpr bool unit = false;
    const int32_t* w;
    uint64_t operator()(int64_t i) const { return static_cast<uint64_t>(w[i]); }
};

template <class Fn>
auto with_keys(const KeySpec& spec, Fn&& fn) {
    if (!spec.scores) return fn(RandomKeys{stream_seed(spec.seed, kStreamKeys)});
    if (spec.ascending) return fn(AscKeys{spec.scores});
    return fn(DescKeys{spec.scores});
}

// An uninitialized int64 scratch array, on transparent huge pages where the OS offers
// them (first-touch page faults otherwise cost more than the work done on the array).
class Scratch {
  public:
    explicit Scratch(int64_t n) {
        constexpr size_t kHuge = size_t{1} << 21;
        const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(int64_t) + kHuge - 1) / kHuge * kHuge;
        data_ = static_cast<int64_t*>(std::aligned_alloc(kHuge, bytes));
        if (!data_) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        madvise(data_, bytes, MADV_HUGEPAGE);
#endif
    }
    ~Scratch() { std::free(data_); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    int64_t* data() const { return data_; }

  private:
    int64_t* data_ = nullptr;
};

struct Candidate {
    uint64_t key;
    int64_t index;
    uint64_t weight;
};

template <class Fn>
auto with_weights(const int32_t* weights, Fn&& fn) {
    if (weights) return fn(TokenWeight{weights});
    return fn(UnitWeight{});
}

// split_range with the inner bounds rounded down to multiples of 64 (whole words of a
// bitset per chunk).
std::vector<int64_t> word_aligned_range(int64_t n, int parts) {
    auto bounds = split_range(n, parts);
    for (size_t c = 1; c + 1 < bounds.size(); ++c) bounds[c] &= ~int64_t{63};
    return bounds;
}

int chunk_of(const std::vector<int64_t>& bounds, int64_t i) {
    return static_cast<int>(std::upper_bound(bounds.begin(), bounds.end(), i) - bounds.begin()) - 1;
}

// fn(shard, shard_base, begin, end) for each non-empty shard segment of [b, e).
template <class Fn>
inline void for_segments(const int64_t* offs, int64_t num_shards, int64_t b, int64_t e, Fn&& fn) {
    if (b >= e) return;
    int64_t s = std::upper_bound(offs, offs + num_shards + 1, b) - offs - 1;
    for (int64_t seg = b; seg < e; ++s) {
        const int64_t seg_end = std::min(e, offs[s + 1]);
        if (seg_end > seg) fn(s, offs[s], seg, seg_end);
        seg = std::max(seg, seg_end);
    }
}

// The first histogram pass reads keys from the key source.
struct PlainFirstPass {
    static constexpr bool fused = false;
    bool ok() const { return true; }
};

// The first pass computes the scores from (sum, count) rows, writes them (when kept) and
// ranks them in the same pass; a non-finite score aborts the plan after that pass.
// Keys come in blocks: blocks(c, b, e, fn) calls fn(i0, keys, m) for the keys of
// instances [i0, i0 + m), blocks of kKeyBlock from b; operator() visits them one by one.
struct ScoredFirstPass {
    static constexpr bool fused = true;
    const ScoredInput* in;
    bool ascending;
    std::vector<BadScores>* bad;  // per chunk

    template <class Fn>
    void blocks(int c, int64_t b, int64_t e, Fn&& fn) const {
        const int64_t S = static_cast<int64_t>(in->shard_offsets.size()) - 1;
        alignas(64) double scores[kKeyBlock];
        alignas(64) uint64_t keys[kKeyBlock];
        BadScores found;
        for (int64_t i0 = b; i0 < e; i0 += kKeyBlock) {
            const int64_t m = std::min(kKeyBlock, e - i0);
            double* v = in->out ? in->out + i0 : scores;  // null out: the caller keeps no scores
            for_segments(in->shard_offsets.data(), S, i0, i0 + m, [&](int64_t s, int64_t base, int64_t sb, int64_t se) {
                const int64_t j = 2 * (sb - base);
                const double* t = in->teacher[s];
                const double* r = in->reference[s];
                found.merge(score_rows(in->kind, t ? t + j : nullptr, r ? r + j : nullptr, v + (sb - i0), se - sb, sb));
            });
            score_keys(v, keys, m, ascending);
            fn(i0, static_cast<const uint64_t*>(keys), m);
        }
        (*bad)[c] = found;
    }
    template <class Visit>
    void operator()(int c, int64_t b, int64_t e, Visit&& visit) const {
        blocks(c, b, e, [&](int64_t i0, const uint64_t* keys, int64_t m) {
            for (int64_t j = 0; j < m; ++j) visit(i0 + j, keys[j]);
        });
    }
    bool ok() const {
        for (const auto& x : *bad)
            if (x.count) return false;
        return true;
    }
};

// What a plan is when some score is not finite: nothing kept.
Plan nothing_planned(int64_t n, const std::vector<int64_t>& bounds, int passes) {
    Plan p;
    p.n = n;
    p.boundary_key = ~0ULL;
    p.boundary_index = -1;
    p.passes = passes;
    p.chunk_bounds = bounds;
    p.chunk_count.assign(bounds.size() - 1, 0);
    return p;
}

// The boundary search. The key range [lo, lo + 2^width - 1] always holds the
// boundary: everything above it is kept (weight above_w <= capacity), and the
// range's weight would overflow the capacity if all of it were kept too.
template <class K, class W, class First>
Plan plan_impl(const K& key, const W& weight, int64_t n, uint64_t capacity,
               const First& first, const std::vector<int64_t>& bounds_in) {
    Plan p;
    p.n = n;
    p.chunk_bounds = bounds_in;
    const int T = static_cast<int>(bounds_in.size()) - 1;
    const auto& bounds = p.chunk_bounds;

    std::vector<int64_t> above_chunk(T, 0);   // kept instances above the range, per chunk
    std::vector<int64_t> range_chunk(T);      // instances inside the range, per chunk
    std::vector<uint64_t> range_wchunk(T, 0); // their weight (known after one level)
    for (int c = 0; c < T; ++c) range_chunk[c] = bounds[c + 1] - bounds[c];
    uint64_t lo = 0;
    int width = 64;
    int64_t range_count = n, above_n = 0;
    uint64_t above_w = 0;

    std::vector<uint64_t> cnt(static_cast<size_t>(T) * kBuckets);
    std::vector<uint64_t> wsum(W::unit ? 0 : static_cast<size_t>(T) * kBuckets);
    std::vector<uint64_t> merged_c(kBuckets), merged_w(kBuckets);

    auto span_of = [](int w) { return w >= 64 ? ~0ULL : ((1ULL << w) - 1); };

    for (bool first_level = true;; first_level = false) {
        const uint64_t span = span_of(width);
        const bool fused = First::fused && first_level;
        if (!fused && range_count <= kSortLimit) {
            // Sort the boundary bucket: (key desc, index asc), then walk the capacity.
            std::vector<int64_t> offs(T + 1, 0);
            for (int c = 0; c < T; ++c) offs[c + 1] = offs[c] + range_chunk[c];
            std::vector<Candidate> cand(static_cast<size_t>(range_count));
            std::atomic<bool> changed{false};
            run_chunks(bounds, [&](int c, int64_t b, int64_t e) {
                int64_t pos = offs[c];
                const int64_t stop = offs[c + 1];
                for (int64_t i = b; i < e; ++i) {
                    const uint64_t k = key(i);
                    if (k - lo <= span) {
                        if (pos == stop) {
                            changed = true;
                            return;
                        }
                        cand[pos++] = {k, i, weight(i)};
                    }
                }
                if (pos != stop) changed = true;
            });
            if (changed) throw std::logic_error("selection: scores changed while selecting");
            ++p.passes;
            std::sort(cand.begin(), cand.end(), [](const Candidate& a, const Candidate& b) {
                return a.key != b.key ? a.key > b.key : a.index < b.index;
            });
            uint64_t room = capacity - above_w;
            int64_t taken = 0;
            p.chunk_count = above_chunk;
            for (const auto& x : cand) {
                if (x.weight > room) break;
                room -= x.weight;
                ++taken;
                ++p.chunk_count[chunk_of(bounds, x.index)];
            }
            if (taken > 0) {
                p.boundary_key = cand[taken - 1].key;
                p.boundary_index = cand[taken - 1].index;
            } else {  // only what lies above the range; lo + span == ~0 keeps nothing
                p.boundary_key = lo + span;
                p.boundary_index = -1;
            }
            p.count = above_n + taken;
            p.weight = capacity - room;
            return p;
        }
        if (!fused && width == 0) {
            // A single key value with many ties: keep them in index order while they fit.
            uint64_t room = capacity - above_w;
            int64_t taken = 0;
            p.chunk_count = above_chunk;
            p.boundary_key = lo;
            p.boundary_index = n - 1;  // unreachable by the invariant: everything fits
            for (int c = 0; c < T; ++c) {
                if (range_wchunk[c] <= room) {
                    room -= range_wchunk[c];
                    taken += range_chunk[c];
                    p.chunk_count[c] += range_chunk[c];
                    continue;
                }
                p.boundary_index = bounds[c] - 1;  // if no tie of chunk c fits
                for (int64_t i = bounds[c]; i < bounds[c + 1]; ++i) {
                    if (key(i) != lo) continue;
                    const uint64_t w = weight(i);
                    if (w > room) break;
                    room -= w;
                    ++taken;
                    ++p.chunk_count[c];
                    p.boundary_index = i;
                }
                break;
            }
            p.count = above_n + taken;
            p.weight = capacity - room;
            return p;
        }

        // One histogram level over the keys inside the range.
        const int shift = std::max(width - kRadixBits, 0);
        const int64_t nb = 1LL << (width - shift);
        run_chunks(bounds, [&](int c, int64_t b, int64_t e) {
            uint64_t* hc = &cnt[static_cast<size_t>(c) * kBuckets];
            std::fill(hc, hc + nb, 0);
            uint64_t* hw = nullptr;
            if constexpr (!W::unit) {
                hw = &wsum[static_cast<size_t>(c) * kBuckets];
                std::fill(hw, hw + nb, 0);
            }
            auto visit = [&](int64_t i, uint64_t key_i) {
                const uint64_t k = key_i - lo;
                if (k <= span) {
                    const uint64_t bucket = k >> shift;
                    ++hc[bucket];
                    if constexpr (!W::unit) hw[bucket] += weight(i);
                }
            };
            if constexpr (First::fused) {
                if (fused) {
                    first(c, b, e, visit);
                    return;
                }
            }
            for (int64_t i = b; i < e; ++i) visit(i, key(i));
        });
        ++p.passes;
        if (fused && !first.ok()) return nothing_planned(n, bounds, p.passes);
        uint64_t total_w = 0;
        for (int64_t b = 0; b < nb; ++b) {
            uint64_t sc = 0, sw = 0;
            for (int c = 0; c < T; ++c) {
                sc += cnt[static_cast<size_t>(c) * kBuckets + b];
                if constexpr (!W::unit) sw += wsum[static_cast<size_t>(c) * kBuckets + b];
            }
            merged_c[b] = sc;
            merged_w[b] = W::unit ? sc : sw;
            total_w += merged_w[b];
        }
        if (first_level && total_w <= capacity) {  // everything fits
            p.boundary_key = 0;
            p.boundary_index = n - 1;
            p.chunk_count = range_chunk;
            p.count = n;
            p.weight = total_w;
            return p;
        }
        int64_t j = -1;
        for (int64_t b = nb - 1; b >= 0; --b) {
            if (merged_w[b] > capacity - above_w) {
                j = b;
                break;
            }
            above_w += merged_w[b];
            above_n += static_cast<int64_t>(merged_c[b]);
            for (int c = 0; c < T; ++c)
                above_chunk[c] += static_cast<int64_t>(cnt[static_cast<size_t>(c) * kBuckets + b]);
        }
        if (j < 0) throw std::logic_error("selection: no boundary bucket (keys changed while selecting?)");
        lo += static_cast<uint64_t>(j) << shift;
        width = shift;
        range_count = static_cast<int64_t>(merged_c[j]);
        for (int c = 0; c < T; ++c) {
            const size_t at = static_cast<size_t>(c) * kBuckets + j;
            range_chunk[c] = static_cast<int64_t>(cnt[at]);
            range_wchunk[c] = W::unit ? cnt[at] : wsum[at];
        }
    }
}

// Whether instance i is kept: from the boundary (key, index), reading its key...
template <class K>
struct BoundaryKeep {
    K key;
    uint64_t bk;
    int64_t bi;
    bool operator()(int64_t i) const {
        const uint64_t k = key(i);
        return (k > bk) | ((k == bk) & (i <= bi));
    }
};
// ...or from the plan's bit per instance (an eighth of a byte read instead of a key).
struct MarkKeep {
    const uint64_t* bits;
    bool operator()(int64_t i) const { return (bits[i >> 6] >> (i & 63)) & 1; }
};

template <class Fn>
auto with_keep(const KeySpec& keys, const Plan& p, Fn&& fn) {
    if (p.kept) return fn(MarkKeep{p.kept.get()});
    return with_keys(keys, [&](const auto& key) {
        return fn(BoundaryKeep<std::decay_t<decltype(key)>>{key, p.boundary_key, p.boundary_index});
    });
}

// Walks every chunk in index order and calls emit(chunk, pos, shard, instance_in_shard,
// global, keep) while pos < the chunk's end row: pos is the output row of the next kept
// instance, so a call with keep == false is overwritten later (branch-free writing).
// From a plan's kept bits only the kept instances are visited, a word at a time. Returns the total weight of the kept instances; checks the plan's counts.
template <class Keep, class W, class Emit>
uint64_t emit_kept(const Keep& kept, const W& weight, const Plan& p, const int64_t* shard_offsets,
                   int64_t num_shards, Emit emit) {
    const int T = static_cast<int>(p.chunk_bounds.size()) - 1;
    std::vector<int64_t> offs(T + 1, 0);
    for (int c = 0; c < T; ++c) offs[c + 1] = offs[c] + p.chunk_count[c];
    std::vector<uint64_t> sums(T, 0);
    std::atomic<bool> mismatch{false};
    run_chunks(p.chunk_bounds, [&](int c, int64_t b, int64_t e) {
        int64_t pos = offs[c];
        const int64_t stop = offs[c + 1];
        uint64_t sum = 0;
        for_segments(shard_offsets, num_shards, b, e, [&](int64_t s, int64_t base, int64_t sb, int64_t se) {
            // Locals, not the captured counters: stores through `out` may alias an int64_t
            // held in memory, which would force a reload per instance.
            int64_t p = pos;
            uint64_t acc = sum;
            if constexpr (std::is_same_v<Keep, MarkKeep>) {
                // From the kept bits, a word at a time: only kept instances are visited.
                for (int64_t w0 = sb & ~int64_t{63}; w0 < se; w0 += 64) {
                    uint64_t x = kept.bits[w0 >> 6];
                    if (w0 < sb) x &= ~0ULL << (sb - w0);
                    if (se - w0 < 64) x &= (1ULL << (se - w0)) - 1;
                    if (p + __builtin_popcountll(x) > stop) {
                        mismatch = true;
                        break;
                    }
                    for (; x; x &= x - 1) {
                        const int64_t i = w0 + __builtin_ctzll(x);
                        emit(c, p++, s, i - base, i, true);
                        if constexpr (!W::unit) acc += weight(i);
                    }
                }
            } else {
                for (int64_t i = sb; i < se; ++i) {
                    const bool keep = kept(i);
                    if (p < stop) emit(c, p, s, i - base, i, keep);
                    p += keep;
                    if constexpr (!W::unit) acc += weight(i) & (0 - static_cast<uint64_t>(keep));
                }
            }
            pos = p;
            sum = acc;
        });
        sums[c] = sum;
        if (pos != stop) mismatch = true;
    });
    if (mismatch)
        throw std::logic_error("selection: the kept count differs from the plan (scores changed since planning?)");
    uint64_t total = 0;
    for (auto v : sums) total += v;
    return total;
}

int shuffle_bucket_bits(int64_t rows) {
    int bits = 0;
    while (bits < 16 && (rows >> (bits + kShuffleBucketBits)) > 0) ++bits;
    return bits;
}

// --- the sampled bracket ---------------------------------------------------------------

// Keys > hi are kept and keys < lo dropped for sure; [lo, hi] is ranked exactly.
struct Bracket {
    uint64_t lo = 0, hi = ~0ULL;
    double inside = 1.0;  // the sample's estimate of the fraction of instances in [lo, hi]
};

// The ranking key of instance i computed straight from the (sum, count) rows, for sampling
// before the scores exist. A non-finite score gets key 0: an unscored instance's (rank_key);
// any other fails the plan anyway.
struct ScoredSampleKey {
    const ScoredInput* in;
    bool ascending;
    uint64_t operator()(int64_t i) const {
        const auto& offs = in->shard_offsets;
        const int64_t s = std::upper_bound(offs.begin(), offs.end(), i) - offs.begin() - 1;
        const int64_t j = 2 * (i - offs[s]);
        const double v = with_score_kind(in->kind, [&](auto kind) {
            return score_of<decltype(kind)::value>(in->teacher[s] + j, in->reference[s] + j);
        });
        return std::isfinite(v) ? rank_key(v, ascending) : 0;
    }
};

// The first pass over plain keys, in the shape of ScoredFirstPass.
inline void fill_keys(const DescKeys& k, int64_t i0, int64_t m, uint64_t* keys) { score_keys(k.s + i0, keys, m, false); }
inline void fill_keys(const AscKeys& k, int64_t i0, int64_t m, uint64_t* keys) { score_keys(k.s + i0, keys, m, true); }
template <class K>
void fill_keys(const K& key, int64_t i0, int64_t m, uint64_t* keys) {
    for (int64_t j = 0; j < m; ++j) keys[j] = key(i0 + j);
}

template <class K>
struct KeyVisitor {
    const K* key;
    template <class Fn>
    void blocks(int, int64_t b, int64_t e, Fn&& fn) const {
        alignas(64) uint64_t keys[kKeyBlock];
        for (int64_t i0 = b; i0 < e; i0 += kKeyBlock) {
            const int64_t m = std::min(kKeyBlock, e - i0);
            fill_keys(*key, i0, m, keys);
            fn(i0, static_cast<const uint64_t*>(keys), m);
        }
    }
    bool ok() const { return true; }
};

// Guesses the bracket from a sample: where the sample's own capacity boundary falls,
// plus and minus kBracketSigmas binomial standard deviations of that position (wider for
// token weights, whose sum varies more). False when a bracket would not pay.
template <class SampleKey, class W>
bool guess_bracket(const SampleKey& sample_key, const W& weight, int64_t n, uint64_t capacity, Bracket* out) {
    const int64_t blocks = std::min<int64_t>(kSampleBlocks, n / (4 * kSampleBlock));
    if (blocks < 16) return false;
    struct Sampled {
        uint64_t key, weight;
    };
    std::vector<Sampled> sample;
    sample.reserve(static_cast<size_t>(blocks * kSampleBlock));
    const uint64_t stream = stream_seed(0, kStreamSample);
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t begin = static_cast<int64_t>(static_cast<unsigned __int128>(n) * b / blocks);
        const int64_t end = static_cast<int64_t>(static_cast<unsigned __int128>(n) * (b + 1) / blocks);
        const int64_t start =
            begin + static_cast<int64_t>(hash64(stream, static_cast<uint64_t>(b)) % static_cast<uint64_t>(end - begin - kSampleBlock + 1));
        for (int64_t i = start; i < start + kSampleBlock; ++i) sample.push_back({sample_key(i), weight(i)});
    }
    const auto desc = [](const Sampled& a, const Sampled& b) { return a.key > b.key; };
    const int64_t m = static_cast<int64_t>(sample.size());
    const double scale = static_cast<double>(n) / static_cast<double>(m);
    int64_t p = m;  // the first sampled rank past the (scaled) capacity
    if constexpr (W::unit) {
        p = static_cast<int64_t>(std::min(static_cast<double>(m), static_cast<double>(capacity) / scale));
    } else {
        std::sort(sample.begin(), sample.end(), desc);
        double acc = 0;
        for (int64_t j = 0; j < m; ++j) {
            acc += static_cast<double>(sample[j].weight) * scale;
            if (acc > static_cast<double>(capacity)) {
                p = j;
                break;
            }
        }
    }
    if (p >= m) return false;  // nearly everything fits: one histogram level finds out
    const double q = std::max(static_cast<double>(p) / m, 1.0 / m);
    const double sigmas = W::unit ? kBracketSigmas : 1.5 * kBracketSigmas;
    const int64_t d = static_cast<int64_t>(sigmas * std::sqrt(m * q * (1 - q))) + 2 * kSampleBlock;
    const int64_t up = p - d, down = p + d;
    if constexpr (W::unit) {  // two order statistics, not a sort
        if (up >= 0) std::nth_element(sample.begin(), sample.begin() + up, sample.end(), desc);
        if (down < m)
            std::nth_element(sample.begin() + std::max<int64_t>(up + 1, 0), sample.begin() + down, sample.end(), desc);
    }
    out->hi = up >= 0 ? sample[up].key : ~0ULL;
    out->lo = down < m ? sample[down].key : 0;
    out->inside = static_cast<double>(std::min(down, m - 1) - std::max<int64_t>(up, 0) + 1) / m;
    return out->inside <= kMaxInside;
}

enum class Outcome { NoGuess, Miss, Bad, Done };

// Keys and weights of the instances collected inside the bracket, by position.
struct InsideKey {
    const uint64_t* keys;
    uint64_t operator()(int64_t j) const { return keys[j]; }
};
template <class W>
struct InsideWeight {
    static constexpr bool unit = W::unit;
    const int64_t* index;
    const W* w;
    uint64_t operator()(int64_t j) const { return (*w)(index[j]); }
};

// One pass: sets the bit of every instance above the bracket (kept for sure) and collects
// the instances inside it; then ranks those exactly with plan_impl and sets the bits of
// the kept ones. Miss: the boundary was not inside the bracket after all. The chunk
// bounds must be multiples of 64 (but the last), so that threads write disjoint words.
// `key` must give the keys once the pass is over (the fused pass writes the scores).
template <class SampleKey, class K, class Visitor, class W>
Outcome plan_bracketed(const SampleKey& sample_key, const K& key, const Visitor& visitor, const W& weight, int64_t n,
                       uint64_t capacity, const std::vector<int64_t>& bounds, int num_threads, Plan* plan) {
    Bracket br;
    if (!guess_bracket(sample_key, weight, n, capacity, &br)) return Outcome::NoGuess;
    const int T = static_cast<int>(bounds.size()) - 1;
    const int64_t words = (n + 63) / 64;
    std::shared_ptr<uint64_t> kept(
        static_cast<uint64_t*>(std::malloc(static_cast<size_t>(std::max<int64_t>(words, 1)) * sizeof(uint64_t))), std::free);
    if (!kept) throw std::bad_alloc();
    uint64_t* bits = kept.get();
    // Every chunk collects into its own slice of one buffer (touched only as far as used).
    const double room_fraction = std::min(1.0, 2 * br.inside + 0.01);
    std::vector<int64_t> slice(T + 1, 0), used(T, 0), above(T, 0);
    std::vector<uint64_t> above_weight(T, 0);
    for (int c = 0; c < T; ++c)
        slice[c + 1] = slice[c] + static_cast<int64_t>(room_fraction * static_cast<double>(bounds[c + 1] - bounds[c])) + 1024;
    std::unique_ptr<int64_t[]> inside(new int64_t[static_cast<size_t>(slice[T])]);
    std::atomic<bool> overflow{false};
    const uint64_t lo = br.lo, hi = br.hi, width = br.hi - br.lo;
    run_chunks(bounds, [&, lo, width, bits](int c, int64_t b, int64_t e) {
        int64_t* out = inside.get() + slice[c];
        const int64_t room = slice[c + 1] - slice[c];
        int64_t m = 0;
        uint64_t above_n = 0, above_w = 0;
        visitor.blocks(c, b, e, [&](int64_t i0, const uint64_t* keys, int64_t count) {
            uint64_t up[kKeyBlock / 64], in[kKeyBlock / 64];
            classify_keys(keys, count, lo, width, up, in);
            if constexpr (!W::unit) above_w += masked_weight_sum(weight.w + i0, up, count);
            for (int64_t w = 0; 64 * w < count; ++w) {
                const int64_t base = i0 + 64 * w;  // a multiple of 64: chunks start on words
                bits[base >> 6] = up[w];
                above_n += static_cast<uint64_t>(__builtin_popcountll(up[w]));
                for (uint64_t x = in[w]; x; x &= x - 1) {
                    if (m < room) out[m] = base + __builtin_ctzll(x);
                    ++m;
                }
            }
        });
        used[c] = std::min(m, room);
        if (m > room) overflow = true;
        above[c] = static_cast<int64_t>(above_n);
        above_weight[c] = W::unit ? above_n : above_w;
    });
    plan->passes = 1;
    if (!visitor.ok()) return Outcome::Bad;
    if (overflow) return Outcome::Miss;
    int64_t above_n = 0;
    uint64_t above_w = 0, inside_w = 0;
    for (int c = 0; c < T; ++c) {
        above_n += above[c];
        above_w += above_weight[c];
    }
    if (above_w > capacity) return Outcome::Miss;  // the boundary is above hi
    // Close the gaps between the slices: the inside instances in global index order, so
    // that positions break ties like global indices do.
    std::vector<int64_t> inside_bounds(T + 1, 0);
    for (int c = 0; c < T; ++c) {
        if (slice[c] != inside_bounds[c])
            std::memmove(inside.get() + inside_bounds[c], inside.get() + slice[c],
                         static_cast<size_t>(used[c]) * sizeof(int64_t));
        inside_bounds[c + 1] = inside_bounds[c] + used[c];
    }
    const int64_t M = inside_bounds[T];
    const int64_t* in = inside.get();
    if constexpr (W::unit) {
        inside_w = static_cast<uint64_t>(M);
    } else {
        for (int64_t j = 0; j < M; ++j) inside_w += weight(in[j]);
    }
    if (above_w + inside_w <= capacity && lo != 0) return Outcome::Miss;  // ...or below lo
    // Their keys, gathered once (in increasing index order) for the ranking passes.
    std::unique_ptr<uint64_t[]> inside_keys(new uint64_t[static_cast<size_t>(std::max<int64_t>(M, 1))]);
    uint64_t* ik = inside_keys.get();
    run_chunks(inside_bounds, [&](int, int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) ik[j] = key(in[j]);
    });
    const Plan r = plan_impl(InsideKey{ik}, InsideWeight<W>{in, &weight}, M, capacity - above_w, PlainFirstPass{},
                             split_range(M, resolve_threads(num_threads, M, kMinChunk)));
    uint64_t bk = hi;  // nothing inside kept: exactly the keys above hi
    int64_t bi = -1;
    if (r.count > 0) {
        bk = r.boundary_key;
        bi = in[r.boundary_index];
    }
    plan->n = n;
    plan->count = above_n + r.count;
    plan->weight = above_w + r.weight;
    plan->boundary_key = bk;
    plan->boundary_index = bi;
    plan->bracketed = true;
    plan->chunk_bounds = bounds;
    plan->chunk_count.assign(T, 0);
    run_chunks(inside_bounds, [&](int c, int64_t b, int64_t e) {  // words of chunk c only
        int64_t kept_here = 0;
        for (int64_t j = b; j < e; ++j) {
            const int64_t i = in[j];
            const uint64_t k = ik[j];
            const bool keep = (k > bk) | ((k == bk) & (i <= bi));
            bits[i >> 6] |= static_cast<uint64_t>(keep) << (i & 63);
            kept_here += keep;
        }
        plan->chunk_count[c] = above[c] + kept_here;
    });
    plan->kept = std::move(kept);
    return Outcome::Done;
}

}  // namespace

Plan plan_selection(const KeySpec& keys, const int32_t* weights, int64_t n, uint64_t capacity,
                    int num_threads, bool bracket) {
    const auto bounds = word_aligned_range(n, resolve_threads(num_threads, n, kMinChunk));
    return with_keys(keys, [&](const auto& key) {
        return with_weights(weights, [&](const auto& w) {
            Plan b;
            if (bracket) {
                using Key = std::decay_t<decltype(key)>;
                if (plan_bracketed(key, key, KeyVisitor<Key>{&key}, w, n, capacity, bounds, num_threads, &b) == Outcome::Done)
                    return b;
            }
            Plan p = plan_impl(key, w, n, capacity, PlainFirstPass{}, bounds);
            p.passes += b.passes;
            return p;
        });
    });
}

Plan plan_scored_selection(const ScoredInput& input, bool ascending, const int32_t* weights,
                           uint64_t capacity, int num_threads, BadScores* bad, bool bracket) {
    ScoredInput in = input;
    const int64_t S = static_cast<int64_t>(in.shard_offsets.size()) - 1;
    const int64_t n = in.shard_offsets[S];
    std::shared_ptr<double> owned;  // the scores, when the caller keeps none but the plan needs them
    auto own_scores = [&] {
        owned.reset(static_cast<double*>(std::malloc(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(double))),
                    std::free);
        if (!owned) throw std::bad_alloc();
        in.out = owned.get();
    };
    KeySpec keys;
    keys.ascending = ascending;
    if (n <= kSortLimit) {  // too small for a histogram pass: score first, then plan
        if (!in.out) own_scores();
        keys.scores = in.out;
        *bad = BadScores{};
        for (int64_t s = 0; s < S; ++s) {
            const int64_t lo = in.shard_offsets[s];
            bad->merge(score_rows(in.kind, in.teacher[s], in.reference[s], in.out + lo, in.shard_offsets[s + 1] - lo, lo));
        }
        if (bad->count) return nothing_planned(n, split_range(n, 1), 0);
        Plan p = plan_selection(keys, weights, n, capacity, num_threads, bracket);
        p.scores = std::move(owned);
        return p;
    }
    const auto bounds = word_aligned_range(n, resolve_threads(num_threads, n, kMinChunk));
    std::vector<BadScores> per_chunk(bounds.size() - 1);
    const ScoredFirstPass first{&in, ascending, &per_chunk};
    auto total_bad = [&] {
        *bad = BadScores{};
        for (const auto& b : per_chunk) bad->merge(b);
    };
    Plan b;
    Outcome outcome = Outcome::NoGuess;
    if (bracket) {
        const ScoredSampleKey rows_key{&in, ascending};  // keys from the rows: no scores kept
        outcome = with_weights(weights, [&](const auto& w) {
            if (!in.out) return plan_bracketed(rows_key, rows_key, first, w, n, capacity, bounds, num_threads, &b);
            keys.scores = in.out;
            return with_keys(keys, [&](const auto& key) {
                return plan_bracketed(rows_key, key, first, w, n, capacity, bounds, num_threads, &b);
            });
        });
    }
    if (outcome == Outcome::Done || outcome == Outcome::Bad) {
        total_bad();
        return outcome == Outcome::Done ? b : nothing_planned(n, bounds, b.passes);
    }
    // No bracket, or it missed: histogram passes over the scores, computed in the first one
    // unless the bracket pass wrote them already.
    const bool fused = outcome == Outcome::NoGuess || !in.out;
    if (!in.out) own_scores();
    keys.scores = in.out;
    Plan p = with_keys(keys, [&](const auto& key) {
        return with_weights(weights, [&](const auto& w) {
            return fused ? plan_impl(key, w, n, capacity, first, bounds)
                         : plan_impl(key, w, n, capacity, PlainFirstPass{}, bounds);
        });
    });
    p.passes += b.passes;
    p.scores = std::move(owned);
    total_bad();
    return p;
}

uint64_t kept_weight(const KeySpec& keys, const Plan& plan, const int32_t* weights) {
    const int64_t whole[2] = {0, plan.n};
    return with_keep(keys, plan, [&](const auto& keep) {
        return emit_kept(keep, TokenWeight{weights}, plan, whole, 1,
                         [](int, int64_t, int64_t, int64_t, int64_t, bool) {});
    });
}

void write_indices(const KeySpec& keys, const Plan& plan, int64_t* out, int64_t stride) {
    const int64_t whole[2] = {0, plan.n};
    with_keep(keys, plan, [&](const auto& keep) {
        return emit_kept(keep, UnitWeight{}, plan, whole, 1,
                         [&](int, int64_t pos, int64_t, int64_t, int64_t g, bool) { out[pos * stride] = g; });
    });
}

uint64_t write_blend(const KeySpec& keys, const Plan& plan, const int64_t* shard_offsets,
                     int64_t num_shards, int64_t* out, bool shuffle, uint64_t shuffle_seed,
                     int num_threads, const int32_t* weights) {
    if (!shuffle) {
        return with_keep(keys, plan, [&](const auto& keep) {
            return with_weights(weights, [&](const auto& w) {
                return emit_kept(keep, w, plan, shard_offsets, num_shards,
                                 [&](int, int64_t pos, int64_t s, int64_t local, int64_t, bool) {
                                     out[2 * pos] = s;
                                     out[2 * pos + 1] = local;
                                 });
            });
        });
    }
    // A parallel uniform shuffle. Every kept instance goes to a bucket drawn from a hash
    // of its global index; buckets are laid out in order, rows keeping their index order
    // inside a bucket; then each bucket gets its own Fisher-Yates shuffle. Random bucket
    // assignment followed by uniform shuffles within buckets is a uniform permutation,
    // and no step depends on the number of threads.
    const int64_t rows = plan.count;
    const int bits = shuffle_bucket_bits(rows);
    const int64_t B = 1LL << bits;
    const uint64_t bucket_stream = stream_seed(shuffle_seed, kStreamBucket);
    auto bucket_of = [&](int64_t g) -> int64_t {
        return bits ? static_cast<int64_t>(hash64(bucket_stream, static_cast<uint64_t>(g)) >> (64 - bits)) : 0;
    };
    const int T = static_cast<int>(plan.chunk_bounds.size()) - 1;
    std::vector<int64_t> pos(static_cast<size_t>(T) * B, 0);
    // 1. Kept global ids into column 0, counting each chunk's bucket sizes on the way.
    const uint64_t total = with_keep(keys, plan, [&](const auto& keep) {
        return with_weights(weights, [&](const auto& w) {
            return emit_kept(keep, w, plan, shard_offsets, num_shards,
                             [&](int c, int64_t p, int64_t, int64_t, int64_t g, bool keep) {
                                 out[2 * p] = g;
                                 pos[static_cast<size_t>(c) * B + bucket_of(g)] += keep;
                             });
        });
    });
    std::vector<int64_t> bucket_begin(B + 1, 0);
    int64_t running = 0;
    for (int64_t b = 0; b < B; ++b) {
        bucket_begin[b] = running;
        for (int c = 0; c < T; ++c) {
            const int64_t n_cb = pos[static_cast<size_t>(c) * B + b];
            pos[static_cast<size_t>(c) * B + b] = running;
            running += n_cb;
        }
    }
    bucket_begin[B] = running;
    // 2. Scatter column 0 into a scratch array at the bucketed positions (each chunk's
    //    rows in order), so that each bucket is contiguous for its shuffle.
    std::vector<int64_t> row_bounds(T + 1, 0);
    for (int c = 0; c < T; ++c) row_bounds[c + 1] = row_bounds[c] + plan.chunk_count[c];
    Scratch scratch(rows);
    int64_t* ids = scratch.data();
    run_chunks(row_bounds, [&](int c, int64_t b, int64_t e) {
        int64_t* next = &pos[static_cast<size_t>(c) * B];
        for (int64_t r = b; r < e; ++r) {
            const int64_t g = out[2 * r];
            ids[next[bucket_of(g)]++] = g;
        }
    });
    // 3. Shuffle each bucket, then turn global ids into (shard, instance) rows. The shard
    //    of a global id: a branch-free count over few shards, else a binary search.
    auto shard_of = [&](int64_t g) -> int64_t {
        if (num_shards <= 64) {
            int64_t s = 0;
            for (int64_t k = 1; k < num_shards; ++k) s += g >= shard_offsets[k];
            while (shard_offsets[s + 1] <= g) ++s;  // skip empty shards ending at g
            return s;
        }
        return std::upper_bound(shard_offsets, shard_offsets + num_shards + 1, g) - shard_offsets - 1;
    };
    const uint64_t shuffle_stream = stream_seed(shuffle_seed, kStreamShuffle);
    std::atomic<int64_t> next_bucket{0};
    const int workers = static_cast<int>(std::min<int64_t>(resolve_threads(num_threads, rows, kMinChunk), B));
    run_chunks(split_range(workers, workers), [&](int, int64_t, int64_t) {
        for (int64_t b; (b = next_bucket.fetch_add(1)) < B;) {
            const int64_t begin = bucket_begin[b], end = bucket_begin[b + 1];
            SplitMix64 rng{hash64(shuffle_stream, static_cast<uint64_t>(b))};
            for (int64_t j = end - 1; j > begin; --j) {
                const int64_t r = begin + static_cast<int64_t>(bounded(rng, static_cast<uint64_t>(j - begin + 1)));
                std::swap(ids[j], ids[r]);
            }
            for (int64_t r = begin; r < end; ++r) {
                const int64_t g = ids[r];
                const int64_t s = shard_of(g);
                out[2 * r] = s;
                out[2 * r + 1] = g - shard_offsets[s];
            }
        }
    });
    return total;
}

}  // namespace miniplm
