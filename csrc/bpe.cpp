#include "bpe.h"

#include <algorithm>
#include <cstring>
#include <queue>
#include <stdexcept>

namespace miniplm {

namespace {

std::array<uint8_t, 128> make_ascii_class() {
    std::array<uint8_t, 128> t{};
    for (int c = 0; c < 128; ++c) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
            t[c] = kLetter;
        else if (c >= '0' && c <= '9')
            t[c] = kDigit;
        else if ((c >= 9 && c <= 13) || c == ' ')  // \t \n \v \f \r and space: Unicode White_Space
            t[c] = kSpace;
        else
            t[c] = kOther;  // punctuation, symbols and the other control characters
    }
    return t;
}

inline uint64_t load_partial(const uint8_t* p, size_t n) {  // n < 8
    uint64_t v = 0;
    std::memcpy(&v, p, n);
    return v;
}

inline uint64_t mix(uint64_t x) {
    x ^= x >> 32;
    x *= 0xd6e8feb86659fd93ull;
    x ^= x >> 32;
    x *= 0xd6e8feb86659fd93ull;
    x ^= x >> 32;
    return x;
}

// The merge table's key of the pair (left, right).
inline uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

inline uint64_t hash_bytes(const uint8_t* p, size_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        h = (h ^ v) * 0x9fb21c651e98df25ull;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) h = (h ^ load_partial(p, n)) * 0x9fb21c651e98df25ull;
    return mix(h);
}

constexpr uint32_t kNoRank = 0xffffffffu;

}  // namespace

const std::array<uint8_t, 128> kAsciiClass = make_ascii_class();

// --------------------------------------------------------------------------- WordCache

WordCache::WordCache() : slots_(size_t{1} << kLog2Slots), mask_((size_t{1} << kLog2Slots) - 1) {
    clear();
}

void WordCache::clear() {
    std::memset(slots_.data(), 0, slots_.size() * sizeof(Slot));
    keys_.clear();
    vals_.clear();
    count_ = 0;
}

bool WordCache::lookup(const uint8_t* word, size_t len, uint64_t hash, std::vector<int32_t>& out) const {
    for (size_t i = hash & mask_;; i = (i + 1) & mask_) {
        const Slot& s = slots_[i];
        if (s.key_len == 0) return false;
        if (s.hash == hash && s.key_len == len && std::memcmp(keys_.data() + s.key_off, word, len) == 0) {
            out.insert(out.end(), vals_.data() + s.val_off, vals_.data() + s.val_off + s.val_len);
            return true;
        }
    }
}

void WordCache::insert(const uint8_t* word, size_t len, uint64_t hash, const int32_t* ids, size_t count) {
    if (len == 0 || len > kMaxWordBytes || count > 0xffff) return;
    // At half load (or 64 MiB of keys and ids) start again: lookups stay short.
    if (count_ + 1 > slots_.size() / 2 || keys_.size() + vals_.size() * 4 > (size_t{64} << 20)) clear();
    size_t i = hash & mask_;
    while (slots_[i].key_len != 0) i = (i + 1) & mask_;
    Slot& s = slots_[i];
    s.hash = hash;
    s.key_off = static_cast<uint32_t>(keys_.size());
    s.val_off = static_cast<uint32_t>(vals_.size());
    s.key_len = static_cast<uint16_t>(len);
    s.val_len = static_cast<uint16_t>(count);
    keys_.insert(keys_.end(), word, word + len);
    vals_.insert(vals_.end(), ids, ids + count);
    ++count_;
}

// --------------------------------------------------------------------------- ByteLevelBpe

ByteLevelBpe::ByteLevelBpe(const std::array<int32_t, 256>& byte_ids, const std::vector<Merge>& merges,
                           bool split_digits, bool ignore_merges,
                           std::unordered_map<std::string, int32_t> whole_words)
    : byte_ids_(byte_ids),
      split_digits_(split_digits),
      ignore_merges_(ignore_merges),
      whole_words_(std::move(whole_words)) {
    for (int32_t id : byte_ids_)
        if (id < -1) throw std::invalid_argument("byte_ids: ids must be >= 0, or -1 for a byte without a token");
    size_t slots = 16;
    while (slots < 2 * merges.size() + 16) slots <<= 1;
    merge_slots_.assign(slots, MergeSlot{~0ull, kNoRank, -1});
    merge_mask_ = slots - 1;
    for (size_t r = 0; r < merges.size(); ++r) {
        const Merge& m = merges[r];
        if (m.left < 0 || m.right < 0 || m.merged < 0)
            throw std::invalid_argument("merges: ids must be >= 0 (merge " + std::to_string(r) + ")");
        const uint64_t key = pair_key(m.left, m.right);
        size_t i = mix(key) & merge_mask_;
        while (merge_slots_[i].key != ~0ull && merge_slots_[i].key != key) i = (i + 1) & merge_mask_;
        // A pair listed again takes its later rank (as a map built in list order).
        merge_slots_[i] = MergeSlot{key, static_cast<uint32_t>(r), m.merged};
    }
}

inline bool ByteLevelBpe::find_merge(int32_t left, int32_t right, uint32_t& rank, int32_t& merged) const {
    const uint64_t key = pair_key(left, right);
    for (size_t i = mix(key) & merge_mask_;; i = (i + 1) & merge_mask_) {
        const MergeSlot& s = merge_slots_[i];
        if (s.key == key) {
            rank = s.rank;
            merged = s.merged;
            return true;
        }
        if (s.key == ~0ull) return false;
    }
}

size_t ByteLevelBpe::byte_tokens(const uint8_t* w, size_t n, int32_t* ids) const {
    size_t m = 0;
    for (size_t i = 0; i < n; ++i)
        if (byte_ids_[w[i]] >= 0) ids[m++] = byte_ids_[w[i]];  // a byte without a token is dropped
    return m;
}

// Up to a few dozen bytes: rescan the pairs after each merge (no allocation).
void ByteLevelBpe::bpe_small(const uint8_t* w, size_t n, std::vector<int32_t>& out) const {
    constexpr size_t kMax = 64;
    int32_t ids[kMax];
    uint32_t ranks[kMax];   // ranks[i]: rank of (ids[i], ids[i + 1])
    int32_t merged[kMax];  // the id that pair merges into
    size_t m = byte_tokens(w, n, ids);
    if (m == 0) return;
    for (size_t i = 0; i + 1 < m; ++i)
        if (!find_merge(ids[i], ids[i + 1], ranks[i], merged[i])) ranks[i] = kNoRank;
    while (m > 1) {
        size_t best = 0;
        uint32_t best_rank = ranks[0];
        for (size_t i = 1; i + 1 < m; ++i)
            if (ranks[i] < best_rank) {
                best_rank = ranks[i];
                best = i;
            }
        if (best_rank == kNoRank) break;
        ids[best] = merged[best];
        // Remove symbol best + 1 and its pair (pairs exist up to m - 2).
        for (size_t i = best + 1; i + 1 < m; ++i) ids[i] = ids[i + 1];
        for (size_t i = best + 1; i + 2 < m; ++i) {
            ranks[i] = ranks[i + 1];
            merged[i] = merged[i + 1];
        }
        --m;
        if (best + 1 < m && !find_merge(ids[best], ids[best + 1], ranks[best], merged[best])) ranks[best] = kNoRank;
        if (best > 0 && !find_merge(ids[best - 1], ids[best], ranks[best - 1], merged[best - 1]))
            ranks[best - 1] = kNoRank;
    }
    out.insert(out.end(), ids, ids + m);
}

// Long pre-tokens (runs of spaces or punctuation): a heap of candidate pairs ordered by
// (rank, position of the left symbol), stale entries skipped: the same merge order as
// bpe_small, in O(n log n).
void ByteLevelBpe::bpe_large(const uint8_t* w, size_t n, std::vector<int32_t>& out) const {
    std::vector<int32_t> ids(n);
    n = byte_tokens(w, n, ids.data());
    ids.resize(n);
    if (n == 0) return;
    std::vector<int64_t> prev(n), next(n);
    for (size_t i = 0; i < n; ++i) {
        prev[i] = static_cast<int64_t>(i) - 1;
        next[i] = i + 1 < n ? static_cast<int64_t>(i + 1) : -1;
    }
    struct Cand {
        uint32_t rank;
        int64_t pos;
        int32_t left, right, merged;
        bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int64_t pos) {
        if (pos < 0 || next[pos] < 0) return;
        uint32_t rank;
        int32_t merged;
        if (find_merge(ids[pos], ids[next[pos]], rank, merged)) heap.push({rank, pos, ids[pos], ids[next[pos]], merged});
    };
    for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int64_t>(i));
    while (!heap.empty()) {
        const Cand c = heap.top();
        heap.pop();
        const int64_t r = next[c.pos];
        // Stale: the left symbol was merged away (ids[pos] = -1), or either side changed.
        if (ids[c.pos] != c.left || r < 0 || ids[r] != c.right) continue;
        ids[c.pos] = c.merged;
        ids[r] = -1;
        next[c.pos] = next[r];
        if (next[r] >= 0) prev[next[r]] = c.pos;
        push(prev[c.pos]);
        push(c.pos);
    }
    for (int64_t i = 0; i >= 0; i = next[i]) out.push_back(ids[i]);
}

void ByteLevelBpe::bpe_word(const uint8_t* w, size_t n, std::vector<int32_t>& out) const {
    if (ignore_merges_) {
        auto it = whole_words_.find(std::string(reinterpret_cast<const char*>(w), n));
        if (it != whole_words_.end()) {
            out.push_back(it->second);
            return;
        }
    }
    if (n <= 64)
        bpe_small(w, n, out);
    else
        bpe_large(w, n, out);
}

inline void ByteLevelBpe::emit_word(const uint8_t* w, size_t n, std::vector<int32_t>& out, WordCache* cache) const {
    if (n == 1) {  // one byte: its own token, nothing to merge (also the whole word's id)
        if (byte_ids_[w[0]] >= 0) out.push_back(byte_ids_[w[0]]);
        return;
    }
    if (cache == nullptr || n > WordCache::kMaxWordBytes) {
        bpe_word(w, n, out);
        return;
    }
    const uint64_t h = hash_bytes(w, n);
    if (cache->lookup(w, n, h, out)) return;
    const size_t before = out.size();
    bpe_word(w, n, out);
    cache->insert(w, n, h, out.data() + before, out.size() - before);
}

// Calls sink(begin, end) for each pre-token of ASCII text [s, s + n), in order.
template <typename Sink>
void ByteLevelBpe::scan(const uint8_t* s, size_t n, Sink&& sink) const {
    const auto& cls = kAsciiClass;
    // The GPT-2 regex over [i, e), e being the end of the text or (split_digits) the next digit.
    auto regex = [&](size_t i, const size_t e) {
        while (i < e) {
            const uint8_t c = s[i];
            if (c == '\'' && i + 1 < e) {  // 's 't 're 've 'm 'll 'd (case-sensitive)
                const uint8_t c1 = s[i + 1];
                size_t len = 0;
                if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')
                    len = 2;
                else if (i + 2 < e && ((c1 == 'r' && s[i + 2] == 'e') || (c1 == 'v' && s[i + 2] == 'e') ||
                                       (c1 == 'l' && s[i + 2] == 'l')))
                    len = 3;
                if (len) {
                    sink(i, i + len);
                    i += len;
                    continue;
                }
            }
            const uint8_t k = cls[c];
            if (k != kSpace || (c == ' ' && i + 1 < e && cls[s[i + 1]] != kSpace)) {
                // " ?\p{L}+", " ?\p{N}+" or " ?[^\s\p{L}\p{N}]+": an optional space, then a run of one class.
                size_t j = (k == kSpace) ? i + 1 : i;
                const uint8_t run = cls[s[j]];
                ++j;
                while (j < e && cls[s[j]] == run) ++j;
                sink(i, j);
                i = j;
                continue;
            }
            // Whitespace: "\s+(?!\S)" takes the run, less its last character when a
            // non-space follows (and fails on a run of one); then "\s+" takes the one.
            size_t j = i + 1;
            while (j < e && cls[s[j]] == kSpace) ++j;
            if (j < e && j - i >= 2) --j;
            sink(i, j);
            i = j;
        }
    };
    if (!split_digits_) {
        regex(0, n);
        return;
    }
    // Digits(individual_digits=true) first: every digit is a pre-token of its own and the
    // regex runs on the text between digits.
    size_t i = 0;
    while (i < n) {
        size_t d = i;
        while (d < n && cls[s[d]] != kDigit) ++d;
        regex(i, d);
        if (d < n) sink(d, d + 1);
        i = d + 1;
    }
}

void ByteLevelBpe::encode(const uint8_t* s, size_t n, std::vector<int32_t>& out, WordCache* cache) const {
    scan(s, n, [&](size_t b, size_t e) { emit_word(s + b, e - b, out, cache); });
}

std::vector<std::pair<size_t, size_t>> ByteLevelBpe::pre_tokenize(const uint8_t* s, size_t n) const {
    std::vector<std::pair<size_t, size_t>> out;
    scan(s, n, [&](size_t b, size_t e) { out.emplace_back(b, e); });
    return out;
}

std::unique_ptr<WordCache> ByteLevelBpe::acquire_cache() {
    {
        std::lock_guard<std::mutex> lock(caches_mutex_);
        if (!idle_caches_.empty()) {
            auto c = std::move(idle_caches_.back());
            idle_caches_.pop_back();
            return c;
        }
    }
    return std::make_unique<WordCache>();
}

void ByteLevelBpe::release_cache(std::unique_ptr<WordCache> cache) {
    if (!cache) return;
    std::lock_guard<std::mutex> lock(caches_mutex_);
    idle_caches_.push_back(std::move(cache));
}

}  // namespace miniplm
