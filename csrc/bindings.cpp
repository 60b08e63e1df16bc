// Python bindings of the C++ index builder: megatron_miniplm._cpp.
// Arrays are read in place (no copies: wrong dtypes or layouts are refused, not
// converted); the GIL is released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "difference.h"
#include "gather.h"
#include "select.h"
#include "simd.h"

namespace py = pybind11;
using f64_array = py::array_t<double, py::array::c_style>;
using i64_array = py::array_t<int64_t, py::array::c_style>;
using i32_array = py::array_t<int32_t, py::array::c_style>;
using u8_array = py::array_t<uint8_t, py::array::c_style>;

namespace {

std::string describe(py::handle obj) {
    if (py::isinstance<py::array>(obj)) {
        auto a = py::reinterpret_borrow<py::array>(obj);
        std::string shape;
        for (py::ssize_t d = 0; d < a.ndim(); ++d) shape += (d ? ", " : "") + std::to_string(a.shape(d));
        return "dtype " + std::string(py::str(a.dtype())) + ", shape (" + shape + ")" +
               (a.flags() & py::array::c_style ? "" : ", not C-contiguous");
    }
    return std::string(py::str(py::type::handle_of(obj).attr("__name__")));
}

// The array behind `obj` without a copy, or a TypeError naming what was expected.
template <class T>
py::array_t<T, py::array::c_style> view(py::handle obj, const char* name, py::ssize_t ndim,
                                        py::ssize_t cols = -1, bool writable = false) {
    using A = py::array_t<T, py::array::c_style>;
    const std::string want = std::string(py::str(py::dtype::of<T>())) +
                             (ndim == 1 ? " array of shape [N]" : " array of shape [N, 2]");
    if (!py::isinstance<A>(obj))
        throw py::type_error(std::string(name) + ": expected a C-contiguous " + want + ", got " + describe(obj));
    auto a = py::reinterpret_borrow<A>(obj);
    if (a.ndim() != ndim || (cols >= 0 && a.shape(1) != cols))
        throw std::invalid_argument(std::string(name) + ": expected a " + want + ", got " + describe(obj));
    if (writable && !a.writeable()) throw std::invalid_argument(std::string(name) + ": array is read-only");
    return a;
}

void check_length(py::ssize_t got, py::ssize_t want, const std::string& what) {
    if (got != want)
        throw std::invalid_argument(what + " has " + std::to_string(got) + " rows, expected " + std::to_string(want));
}

miniplm::ScoreKind parse_kind(const std::string& kind);

py::tuple compute_scores(const std::string& kind, py::object teacher, py::object reference,
                         py::object out, int num_threads) {
    const miniplm::ScoreKind k = parse_kind(kind);
    auto o = view<double>(out, "out", 1, -1, true);
    const int64_t n = o.shape(0);
    const double* tp = nullptr;
    const double* rp = nullptr;
    f64_array t, r;  // keep the views alive while computing
    if (k != miniplm::ScoreKind::ReferenceMean) {
        t = view<double>(teacher, "teacher", 2, 2);
        check_length(t.shape(0), n, "teacher scores");
        tp = t.data();
    }
    if (k != miniplm::ScoreKind::TeacherMean) {
        r = view<double>(reference, "reference", 2, 2);
        check_length(r.shape(0), n, "reference scores");
        rp = r.data();
    }
    double* op = o.mutable_data();
    miniplm::BadScores bad;
    {
        py::gil_scoped_release release;
        bad = miniplm::compute_scores(k, tp, rp, op, n, num_threads);
    }
    return py::make_tuple(bad.count, bad.first);
}

// Raises unless every weight is >= 0, naming the first negative one. One parallel pass
// that ORs the weights (a negative one sets the sign bit: vectorizes), without the GIL.
void check_weights(const int32_t* w, int64_t n, int num_threads) {
    const auto bounds = miniplm::split_range(n, miniplm::resolve_threads(num_threads, n, 1 << 20));
    std::vector<int64_t> first(bounds.size() - 1, -1);
    {
        py::gil_scoped_release release;
        miniplm::run_chunks(bounds, [&](int c, int64_t b, int64_t e) {
            uint32_t any = 0;
            for (int64_t i = b; i < e; ++i) any |= static_cast<uint32_t>(w[i]);
            if (any >> 31)
                for (int64_t i = b; first[c] < 0; ++i)
                    if (w[i] < 0) first[c] = i;
        });
    }
    for (int64_t i : first)
        if (i >= 0) throw std::invalid_argument("weights: instance " + std::to_string(i) + " has a negative weight");
}

// A planned selection; keeps the key and weight arrays alive for the writers.
struct Selection {
    miniplm::Plan plan;
    miniplm::KeySpec keys;
    py::object scores_ref, weights_ref;

    std::vector<int64_t> offsets(py::object shard_offsets) const {
        auto a = view<int64_t>(shard_offsets, "shard_offsets", 1);
        if (a.shape(0) < 2) throw std::invalid_argument("shard_offsets: needs at least 2 entries [0, ..., n]");
        std::vector<int64_t> v(a.data(), a.data() + a.shape(0));
        if (v.front() != 0 || v.back() != plan.n)
            throw std::invalid_argument("shard_offsets: must start at 0 and end at n = " + std::to_string(plan.n));
        for (size_t s = 1; s < v.size(); ++s)
            if (v[s] < v[s - 1]) throw std::invalid_argument("shard_offsets: must be non-decreasing");
        return v;
    }

    void write_indices(py::object out) const {
        auto o = view<int64_t>(out, "out", 1, -1, true);
        check_length(o.shape(0), plan.count, "out");
        int64_t* op = o.mutable_data();
        py::gil_scoped_release release;
        miniplm::write_indices(keys, plan, op, 1);
    }

    uint64_t kept_weight(py::object weights) const {
        auto w = view<int32_t>(weights, "weights", 1);
        check_length(w.shape(0), plan.n, "weights");
        const int32_t* wp = w.data();
        check_weights(wp, plan.n, 0);
        py::gil_scoped_release release;
        return miniplm::kept_weight(keys, plan, wp);
    }

    py::object write_blend(py::object out, py::object shard_offsets, std::optional<uint64_t> shuffle_seed,
                           int num_threads, py::object weights) const {
        auto o = view<int64_t>(out, "out", 2, 2, true);
        check_length(o.shape(0), plan.count, "out");
        const auto offs = offsets(shard_offsets);
        const int32_t* wp = nullptr;
        i32_array w;
        if (!weights.is_none()) {
            w = view<int32_t>(weights, "weights", 1);
            check_length(w.shape(0), plan.n, "weights");
            wp = w.data();
        }
        int64_t* op = o.mutable_data();
        uint64_t total;
        {
            py::gil_scoped_release release;
            total = miniplm::write_blend(keys, plan, offs.data(), static_cast<int64_t>(offs.size()) - 1, op,
                                         shuffle_seed.has_value(), shuffle_seed.value_or(0), num_threads, wp);
        }
        if (!wp) return py::none();
        return py::int_(total);
    }
};

// Pointers to per-shard [n_s, 2] float64 score arrays (None allowed when unused).
std::vector<const double*> shard_rows(py::object arrays, const char* name, const std::vector<int64_t>& offs,
                                      bool needed, std::vector<f64_array>& keep) {
    const size_t S = offs.size() - 1;
    std::vector<const double*> ptrs(S, nullptr);
    if (!needed) return ptrs;
    if (arrays.is_none()) throw std::invalid_argument(std::string(name) + ": scores are needed for this kind");
    auto list = py::reinterpret_borrow<py::sequence>(arrays);
    if (list.size() != S)
        throw std::invalid_argument(std::string(name) + ": " + std::to_string(list.size()) + " arrays for " +
                                    std::to_string(S) + " shards");
    for (size_t s = 0; s < S; ++s) {
        const std::string what = std::string(name) + "[" + std::to_string(s) + "]";
        keep.push_back(view<double>(list[s], what.c_str(), 2, 2));
        check_length(keep.back().shape(0), offs[s + 1] - offs[s], what);
        ptrs[s] = keep.back().data();
    }
    return ptrs;
}

miniplm::ScoreKind parse_kind(const std::string& kind) {
    if (kind == "difference") return miniplm::ScoreKind::Difference;
    if (kind == "teacher") return miniplm::ScoreKind::TeacherMean;
    if (kind == "reference") return miniplm::ScoreKind::ReferenceMean;
    throw std::invalid_argument("kind must be difference, teacher or reference, got " + kind);
}

Selection select_instances(py::object scores, uint64_t capacity, py::object weights, bool ascending,
                 std::optional<uint64_t> random_seed, std::optional<int64_t> n, int num_threads, bool bracket) {
    Selection sel;
    int64_t count;
    if (random_seed.has_value()) {
        if (!scores.is_none()) throw std::invalid_argument("select: pass scores or random_seed, not both");
        if (!n.has_value() || *n < 0) throw std::invalid_argument("select: random keys need n >= 0");
        sel.keys.seed = *random_seed;
        count = *n;
    } else {
        auto s = view<double>(scores, "scores", 1);
        sel.keys.scores = s.data();
        sel.keys.ascending = ascending;
        sel.scores_ref = s;
        count = s.shape(0);
        if (n.has_value() && *n != count) check_length(count, *n, "scores");
    }
    const int32_t* wp = nullptr;
    if (!weights.is_none()) {
        auto w = view<int32_t>(weights, "weights", 1);
        check_length(w.shape(0), count, "weights");
        wp = w.data();
        sel.weights_ref = w;
        check_weights(wp, count, num_threads);
    }
    py::gil_scoped_release release;
    sel.plan = miniplm::plan_selection(sel.keys, wp, count, capacity, num_threads, bracket);
    return sel;
}

// Scores computed while planning (one pass less than compute_scores + select).
py::tuple select_scored(const std::string& kind, py::object teacher, py::object reference,
                        py::object shard_offsets, py::object out, uint64_t capacity, py::object weights,
                        bool ascending, int num_threads, bool bracket) {
    miniplm::ScoredInput in;
    in.kind = parse_kind(kind);
    auto so = view<int64_t>(shard_offsets, "shard_offsets", 1);
    in.shard_offsets.assign(so.data(), so.data() + so.shape(0));
    if (in.shard_offsets.size() < 2 || in.shard_offsets.front() != 0)
        throw std::invalid_argument("shard_offsets: needs [0, ..., n] with at least one shard");
    for (size_t s = 1; s < in.shard_offsets.size(); ++s)
        if (in.shard_offsets[s] < in.shard_offsets[s - 1])
            throw std::invalid_argument("shard_offsets: must be non-decreasing");
    const int64_t n = in.shard_offsets.back();
    std::vector<f64_array> keep;
    in.teacher = shard_rows(teacher, "teacher", in.shard_offsets, in.kind != miniplm::ScoreKind::ReferenceMean, keep);
    in.reference = shard_rows(reference, "reference", in.shard_offsets, in.kind != miniplm::ScoreKind::TeacherMean, keep);
    Selection sel;
    if (!out.is_none()) {
        auto o = view<double>(out, "out", 1, -1, true);
        check_length(o.shape(0), n, "out");
        in.out = o.mutable_data();
        sel.scores_ref = o;
    }
    const int32_t* wp = nullptr;
    if (!weights.is_none()) {
        auto w = view<int32_t>(weights, "weights", 1);
        check_length(w.shape(0), n, "weights");
        wp = w.data();
        check_weights(wp, n, num_threads);
        sel.weights_ref = w;
    }
    sel.keys.ascending = ascending;
    miniplm::BadScores bad;
    {
        py::gil_scoped_release release;
        sel.plan = miniplm::plan_scored_selection(in, ascending, wp, capacity, num_threads, &bad, bracket);
    }
    if (bad.count) return py::make_tuple(py::none(), bad.count, bad.first);
    // The writers read keys only for histogram plans: from `out`, or from the scores the
    // plan computed itself when out was None.
    sel.keys.scores = sel.plan.scores ? sel.plan.scores.get() : in.out;
    if (!sel.plan.kept && !sel.keys.scores) throw std::logic_error("select_scored: a plan without keys");
    return py::make_tuple(py::cast(std::move(sel)), 0, -1);
}

void gather_bytes(py::list sources, py::object shard, py::object offset, py::object nbytes,
                  py::object out, int num_threads) {
    std::vector<u8_array> src;
    std::vector<const uint8_t*> ptrs;
    std::vector<int64_t> sizes;
    for (size_t s = 0; s < sources.size(); ++s) {
        src.push_back(view<uint8_t>(sources[s], ("sources[" + std::to_string(s) + "]").c_str(), 1));
        ptrs.push_back(src.back().data());
        sizes.push_back(src.back().shape(0));
    }
    auto sh = view<int64_t>(shard, "shard", 1);
    auto of = view<int64_t>(offset, "offset", 1);
    auto nb = view<int64_t>(nbytes, "nbytes", 1);
    check_length(of.shape(0), sh.shape(0), "offset");
    check_length(nb.shape(0), sh.shape(0), "nbytes");
    auto o = view<uint8_t>(out, "out", 1, -1, true);
    const int64_t rows = sh.shape(0), out_size = o.shape(0);
    const int64_t* shp = sh.data();
    const int64_t* ofp = of.data();
    const int64_t* nbp = nb.data();
    uint8_t* op = o.mutable_data();
    py::gil_scoped_release release;
    miniplm::gather_bytes(ptrs.data(), sizes.data(), static_cast<int64_t>(ptrs.size()), shp, ofp, nbp,
                          rows, op, out_size, num_threads);
}

}  // namespace

void bind_bpe(py::module_& m);  // bpe_bindings.cpp

PYBIND11_MODULE(_cpp, m) {
    bind_bpe(m);
    m.doc() = "C++ kernels of megatron-miniplm (Difference Sampling index builder)";
    m.def("compute_scores", &compute_scores, py::arg("kind"), py::arg("teacher"), py::arg("reference"),
          py::arg("out"), py::arg("num_threads") = 0,
          "Writes per-instance scores into `out` ([N] float64): kind 'difference' (reference mean\n"
          "NLL - teacher mean NLL), 'teacher' or 'reference' (that model's mean NLL). Inputs are\n"
          "[N, 2] float64 (nll_sum, token_count). A row (0, 0) (an instance with no counted\n"
          "prediction; for 'difference' in both files) scores NaN: unscored, ranked last. Returns\n"
          "(number of unusable rows, first such row or -1): any other non-finite value or count <= 0.");
    m.def("order_key", [](double x) { return miniplm::order_key(x); }, py::arg("x"),
          "The uint64 ranking key of a float (monotone; -0.0 == +0.0).");
    m.def("simd_kernels", [] { return std::string(miniplm::use_avx2() ? "avx2" : "portable"); },
          "Which build of the scoring and selection kernels runs here: 'avx2' when the CPU has it,\n"
          "else (or with MINIPLM_NO_AVX2=1) 'portable'. Both give identical results.");

    py::class_<Selection>(m, "Selection",
                          "A planned selection. Instance i is kept iff key(i) > boundary_key or\n"
                          "(key(i) == boundary_key and i <= boundary_index).")
        .def_property_readonly("n", [](const Selection& s) { return s.plan.n; })
        .def_property_readonly("count", [](const Selection& s) { return s.plan.count; })
        .def_property_readonly("weight", [](const Selection& s) { return s.plan.weight; })
        .def_property_readonly("boundary_key", [](const Selection& s) { return s.plan.boundary_key; })
        .def_property_readonly("boundary_index", [](const Selection& s) { return s.plan.boundary_index; })
        .def_property_readonly("passes", [](const Selection& s) { return s.plan.passes; })
        .def_property_readonly("bracketed", [](const Selection& s) { return s.plan.bracketed; },
                               "Whether one sampled-bracket pass found it (else radix-histogram passes).")
        .def("kept_weight", &Selection::kept_weight, py::arg("weights"),
             "Sum of weights ([N] int32, e.g. sequence lengths) over the kept instances.")
        .def("write_indices", &Selection::write_indices, py::arg("out"),
             "Writes the kept global indices, ascending, into out ([count] int64).")
        .def("write_blend", &Selection::write_blend, py::arg("out"), py::arg("shard_offsets"),
             py::arg("shuffle_seed") = py::none(), py::arg("num_threads") = 0, py::arg("weights") = py::none(),
             "Writes (shard, instance) rows into out ([count, 2] int64): in index order, or in a\n"
             "seeded uniform random order when shuffle_seed is given. With weights ([N] int32),\n"
             "returns their total over the kept instances (summed in the same pass), else None.");

    m.def("select", &select_instances, py::arg("scores"), py::arg("capacity"), py::kw_only(),
          py::arg("weights") = py::none(), py::arg("ascending") = false,
          py::arg("random_seed") = py::none(), py::arg("n") = py::none(), py::arg("num_threads") = 0,
          py::arg("bracket") = true,
          "Ranks instances by score (descending, or ascending), ties by lower index, or by seeded\n"
          "uniform random keys (scores=None, random_seed, n), and keeps the longest prefix of the\n"
          "ranking whose weight fits `capacity`: a count of instances, or tokens when `weights`\n"
          "([N] int32, e.g. sequence lengths) is given. NaN ranks last in either direction (an\n"
          "unscored instance). bracket=False skips\n"
          "the sampled one-pass bracket (same result; for tests and benchmarks).");
    m.def("select_scored", &select_scored, py::arg("kind"), py::arg("teacher"), py::arg("reference"),
          py::arg("shard_offsets"), py::arg("out"), py::arg("capacity"), py::kw_only(),
          py::arg("weights") = py::none(), py::arg("ascending") = false, py::arg("num_threads") = 0,
          py::arg("bracket") = true,
          "compute_scores over per-shard [n_s, 2] arrays (lists, None where unused) into out ([N]\n"
          "float64, or None to keep no scores) fused with select(out, capacity, ...): returns\n"
          "(Selection, 0, -1), or\n"
          "(None, number of unusable rows, first such global index) and plans nothing. Unscored\n"
          "(0, 0) rows are not unusable: they rank last.");
    m.def("gather_bytes", &gather_bytes, py::arg("sources"), py::arg("shard"), py::arg("offset"),
          py::arg("nbytes"), py::arg("out"), py::arg("num_threads") = 0,
          "Copies sources[shard[r]][offset[r]:offset[r]+nbytes[r]] for every row r, back to back, into out.");
}
