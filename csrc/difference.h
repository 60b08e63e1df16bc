// Per-instance scores from (nll_sum, token_count) score files: pure C++ on raw buffers.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "parallel.h"

namespace miniplm {

// What a selection ranks instances by.
enum class ScoreKind { Difference, TeacherMean, ReferenceMean };

// Instances whose score is unusable: a non-finite sum or count, a count <= 0 (but for
// an unscored row, (0, 0)), or a non-finite result. `first` is the lowest such index (-1 if none).
struct BadScores {
    int64_t count = 0;
    int64_t first = -1;
    // Adds the bad rows of a later range (higher indices): the lowest index stays first.
    void merge(const BadScores& later) {
        if (first < 0) first = later.first;
        count += later.count;
    }
};

// Mean NLL of a (sum, count) row; NaN when the row cannot give one (count <= 0,
// NaN or infinite count); an infinite or NaN sum propagates. Written as a division by
// a selected divisor, without a branch, so that loops over rows vectorize.
inline double mean_nll(const double* row) {
    const double sum = row[0], count = row[1];
    const bool usable = count > 0 && count <= DBL_MAX;
    return sum / (usable ? count : std::numeric_limits<double>::quiet_NaN());
}

// An instance with no counted prediction (one token, or only EOD inputs) has the row
// (0, 0) from the scorer: it has no score. Its score is NaN (0 / 0), which ranks after
// every scored instance (rank_key) and is not refused; any other non-finite score is.
template <ScoreKind kind>
inline bool unscored(const double* teacher_row, const double* reference_row) {
    const auto none = [](const double* row) { return row[0] == 0.0 && row[1] == 0.0; };
    if constexpr (kind == ScoreKind::Difference) return none(teacher_row) && none(reference_row);
    else if constexpr (kind == ScoreKind::TeacherMean) return none(teacher_row);
    else return none(reference_row);
}

template <ScoreKind kind>
inline double score_of(const double* teacher_row, const double* reference_row) {
    if constexpr (kind == ScoreKind::Difference) return mean_nll(reference_row) - mean_nll(teacher_row);
    else if constexpr (kind == ScoreKind::TeacherMean) return mean_nll(teacher_row);
    else return mean_nll(reference_row);
}

// Calls fn(std::integral_constant<ScoreKind, kind>{}) for the runtime `kind`.
template <class Fn>
auto with_score_kind(ScoreKind kind, Fn&& fn) {
    switch (kind) {
        case ScoreKind::TeacherMean:
            return fn(std::integral_constant<ScoreKind, ScoreKind::TeacherMean>{});
        case ScoreKind::ReferenceMean:
            return fn(std::integral_constant<ScoreKind, ScoreKind::ReferenceMean>{});
        default:
            return fn(std::integral_constant<ScoreKind, ScoreKind::Difference>{});
    }
}

// out[j] = the score of `kind` for row j < m, in one thread; the bad rows, numbered
// from `index0` (row j is instance index0 + j). The hot loop of scoring and of selection
// from score files (AVX2 where the CPU has it: the two divisions per row dominate otherwise).
BadScores score_rows(ScoreKind kind, const double* teacher, const double* reference, double* out, int64_t m,
                     int64_t index0);

// out[i] = the score of `kind` for instance i; rows are (nll_sum, token_count).
// `teacher` or `reference` may be null when `kind` does not read it.
BadScores compute_scores(ScoreKind kind, const double* teacher, const double* reference,
                         double* out, int64_t n, int num_threads);

}  // namespace miniplm
