// Top-k / token-budget selection and the sampled blend, on raw buffers.
//
// Instances are ranked by a 64-bit key, larger first, ties broken by the lower
// global index. A selection keeps the longest prefix of that ranking whose total
// weight (1 per instance, or its token count) fits a capacity. The result is a
// boundary (key, index): instance i is kept iff
//     key(i) > boundary_key  or  (key(i) == boundary_key and i <= boundary_index).
//
// It is found without sorting, usually in one pass over the keys: a small sample
// of keys brackets the boundary key; the pass marks every instance kept, dropped
// or "inside the bracket", and only the few inside are ranked exactly. The
// kept bits are kept, so writing the blend reads one bit per instance instead of
// its key. If the sample misjudged (rare: ties, adversarial order),
// radix-histogram passes over all keys narrow the boundary down instead.
// The hot loops of the pass are block kernels (rank_keys.h, score_rows), with AVX2
// builds chosen at run time (simd.h).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "difference.h"
#include "rank_keys.h"

namespace miniplm {

// Where ranking keys come from.
struct KeySpec {
    const double* scores = nullptr;  // null: uniform random keys drawn from `seed`
    bool ascending = false;          // rank the lowest scores first
    uint64_t seed = 0;               // random keys only
};

struct Plan {
    int64_t n = 0;
    int64_t count = 0;          // instances kept
    uint64_t weight = 0;        // their total weight
    uint64_t boundary_key = 0;  // see the header comment
    int64_t boundary_index = -1;
    int passes = 0;             // full passes over the keys (for benchmarks)
    bool bracketed = false;     // found by the sampled bracket (else by histograms)
    std::vector<int64_t> chunk_bounds;  // the writer's chunks of [0, n)
    std::vector<int64_t> chunk_count;   // kept instances per chunk
    std::shared_ptr<uint64_t> kept;     // bit i set iff instance i is kept (bracketed plans only)
    std::shared_ptr<double> scores;     // scores the plan computed itself (ScoredInput without out)
};

// Finds the kept set. `weights` (may be null: weight 1) must be >= 0.
// `bracket` false: histogram passes only (for tests of both paths).
Plan plan_selection(const KeySpec& keys, const int32_t* weights, int64_t n, uint64_t capacity,
                    int num_threads, bool bracket = true);

// Scores computed from per-shard (nll_sum, token_count) rows while planning: the first
// pass computes them block by block (and writes out[i] when asked), so the scores are
// never read back from memory.
struct ScoredInput {
    ScoreKind kind = ScoreKind::Difference;
    std::vector<const double*> teacher, reference;  // per shard; null where `kind` does not read it
    std::vector<int64_t> shard_offsets;             // S + 1 entries
    double* out = nullptr;                          // [n] scores, written; null: not kept
};

// Like plan_selection on the scores of `in`. If any score is not finite, nothing is
// planned (count 0) and `bad` says how many and where the first is.
Plan plan_scored_selection(const ScoredInput& in, bool ascending, const int32_t* weights,
                           uint64_t capacity, int num_threads, BadScores* bad, bool bracket = true);

// Total of `weights` (e.g. tokens) over the kept instances.
uint64_t kept_weight(const KeySpec& keys, const Plan& plan, const int32_t* weights);

// Kept instances as sorted global indices: out[j * stride], j < plan.count.
void write_indices(const KeySpec& keys, const Plan& plan, int64_t* out, int64_t stride);

// Kept instances as (shard, instance-in-shard) rows of out[plan.count][2], in index
// order, or shuffled with a seeded uniform permutation when `shuffle` is set.
// shard_offsets[s] is the global index of shard s's first instance; shard_offsets[S] == n.
// Returns the total of `weights` over the kept instances (0 if weights is null), summed
// in the same pass.
uint64_t write_blend(const KeySpec& keys, const Plan& plan, const int64_t* shard_offsets,
                     int64_t num_shards, int64_t* out, bool shuffle, uint64_t shuffle_seed,
                     int num_threads, const int32_t* weights = nullptr);

}  // namespace miniplm
