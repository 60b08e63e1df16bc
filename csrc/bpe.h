// A native encoder for GPT-2-style byte-level BPE tokenizers (HF tokenizer.json with a
// ByteLevel pre-tokenizer, no normalizer), for ASCII text: the GPT-2 pre-tokenizer regex
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// as a hand-written scanner (alternatives tried in order at each position, as a
// backtracking regex engine does), then BPE over each pre-token's bytes by merge rank
// (the adjacent pair of lowest rank first, the leftmost among equals), with a word cache.
//
// Text that is not ASCII is not encoded here: `split_mixed` cuts a text into pieces at
// positions where the pre-tokenizer always splits, so that ASCII pieces can be encoded
// here and the others by the reference encoder, each piece on its own, with the same
// result as encoding the whole text.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace miniplm {

// Pre-token text -> token ids, for one thread at a time. Bounded: when full it is
// emptied (words are cached again as they recur).
class WordCache {
public:
    WordCache();
    // Appends the ids cached for `word` to `out`; false (nothing appended) if absent.
    bool lookup(const uint8_t* word, size_t len, uint64_t hash, std::vector<int32_t>& out) const;
    void insert(const uint8_t* word, size_t len, uint64_t hash, const int32_t* ids, size_t count);
    void clear();

    static constexpr size_t kMaxWordBytes = 255;  // longer pre-tokens are not cached
    static constexpr int kLog2Slots = 18;

private:
    struct Slot {
        uint64_t hash;
        uint32_t key_off;
        uint32_t val_off;
        uint16_t key_len;  // 0: empty slot (pre-tokens are never empty)
        uint16_t val_len;
    };
    std::vector<Slot> slots_;
    std::vector<uint8_t> keys_;
    std::vector<int32_t> vals_;
    size_t mask_;
    size_t count_ = 0;
};

// Byte ranges [begin, end) of a text: `ascii` ones can be encoded by ByteLevelBpe,
// the others need the reference encoder.
struct Piece {
    size_t begin;
    size_t end;
    bool ascii;
};

class ByteLevelBpe {
public:
    struct Merge {
        int32_t left;
        int32_t right;
        int32_t merged;
    };
    // byte_ids[b]: the id of the one-byte token of byte b, or -1 if the vocabulary has none
    // (the byte is then dropped before merging, as tokenizers does without unk). merges: in rank order (a pair
    // listed twice keeps its last rank). split_digits: the pre-tokenizer is
    // Sequence[Digits(individual_digits), ByteLevel]. whole_words (ignore_merges): a
    // pre-token found here is that one token, without merging.
    ByteLevelBpe(const std::array<int32_t, 256>& byte_ids, const std::vector<Merge>& merges, bool split_digits,
                 bool ignore_merges, std::unordered_map<std::string, int32_t> whole_words);

    // Appends the ids of ASCII text [s, s + n) to `out`. `cache` may be null.
    void encode(const uint8_t* s, size_t n, std::vector<int32_t>& out, WordCache* cache) const;

    // The pre-tokens of ASCII text, as [begin, end) offsets (for tests).
    std::vector<std::pair<size_t, size_t>> pre_tokenize(const uint8_t* s, size_t n) const;

    // A cache for one caller at a time, reused across calls; give it back with release_cache.
    std::unique_ptr<WordCache> acquire_cache();
    void release_cache(std::unique_ptr<WordCache> cache);

    bool split_digits() const { return split_digits_; }

private:
    struct MergeSlot {
        uint64_t key;  // (left << 32) | right, ~0ull: empty
        uint32_t rank;
        int32_t merged;
    };
    bool find_merge(int32_t left, int32_t right, uint32_t& rank, int32_t& merged) const;
    // The one-byte token ids of w[0, n) into ids (bytes without a token dropped); how many.
    size_t byte_tokens(const uint8_t* w, size_t n, int32_t* ids) const;
    // Ids of one pre-token (BPE), appended to `out`.
    void bpe_word(const uint8_t* w, size_t n, std::vector<int32_t>& out) const;
    void bpe_small(const uint8_t* w, size_t n, std::vector<int32_t>& out) const;
    void bpe_large(const uint8_t* w, size_t n, std::vector<int32_t>& out) const;
    void emit_word(const uint8_t* w, size_t n, std::vector<int32_t>& out, WordCache* cache) const;
    template <typename Sink>
    void scan(const uint8_t* s, size_t n, Sink&& sink) const;

    std::array<int32_t, 256> byte_ids_;
    std::vector<MergeSlot> merge_slots_;
    uint64_t merge_mask_ = 0;
    bool split_digits_;
    bool ignore_merges_;
    std::unordered_map<std::string, int32_t> whole_words_;

    std::mutex caches_mutex_;
    std::vector<std::unique_ptr<WordCache>> idle_caches_;
};

// Pre-tokenizer character classes of ASCII code units (also used by split_mixed).
enum : uint8_t { kLetter = 0, kDigit = 1, kSpace = 2, kOther = 3 };
extern const std::array<uint8_t, 128> kAsciiClass;

// Cuts text of code units (uint8_t, uint16_t or uint32_t: code points) into pieces. A
// cut at p (0 < p < n) is allowed where unit p - 1 is ASCII and not whitespace and unit
// p is ASCII whitespace: every pre-token then ends at p or begins at p (no pre-token
// reaches over a non-whitespace/whitespace edge except " ?X+" which begins with the
// space, and the regex has no look-behind), with or without the Digits split. Pieces
// alternate between ASCII and non-ASCII; ASCII runs shorter than `min_ascii` units
// between non-ASCII pieces are merged into them (fewer, larger reference calls).
template <typename CU>
void split_mixed(const CU* s, size_t n, size_t min_ascii, std::vector<Piece>& out) {
    out.clear();
    auto is_space = [](uint32_t c) { return c < 128 && kAsciiClass[c] == kSpace; };
    auto push = [&](size_t b, size_t e, bool ascii) {
        if (b == e) return;
        if (!out.empty() && out.back().ascii == ascii) {
            out.back().end = e;
            return;
        }
        out.push_back({b, e, ascii});
    };
    size_t span = 0;
    bool span_ascii = true;
    for (size_t p = 0; p < n; ++p) {
        const uint32_t c = static_cast<uint32_t>(s[p]);
        if (c >= 128) {
            span_ascii = false;
            continue;
        }
        if (p > 0 && is_space(c)) {
            const uint32_t prev = static_cast<uint32_t>(s[p - 1]);
            if (prev < 128 && !is_space(prev)) {
                push(span, p, span_ascii);
                span = p;
                span_ascii = true;
            }
        }
    }
    push(span, n, span_ascii);
    if (min_ascii == 0 || out.size() < 3) return;
    // Short ASCII pieces between two non-ASCII ones join them.
    std::vector<Piece> merged;
    merged.reserve(out.size());
    for (size_t i = 0; i < out.size(); ++i) {
        const Piece& p = out[i];
        const bool inner = i > 0 && i + 1 < out.size();
        if (p.ascii && inner && p.end - p.begin < min_ascii) {
            merged.back().end = p.end;  // previous is non-ASCII
            continue;
        }
        if (!p.ascii && !merged.empty() && !merged.back().ascii) {
            merged.back().end = p.end;
            continue;
        }
        merged.push_back(p);
    }
    out.swap(merged);
}

}  // namespace miniplm
