// Python bindings of the C++ index builder: megatron_miniplm._cpp.
// Arrays are read in place (no copies); the GIL is released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "difference.h"

namespace py = pybind11;
using f64_array = py::array_t<double, py::array::c_style>;

static void check_scores(const f64_array& a, const char* name) {
    if (a.ndim() != 2 || a.shape(1) != 2)
        throw std::invalid_argument(std::string(name) +
                                    ": expected a float64 array of shape [N, 2] (nll_sum, token_count)");
}

static f64_array difference_scores(const f64_array& teacher, const f64_array& reference,
                                   int num_threads) {
    check_scores(teacher, "teacher");
    check_scores(reference, "reference");
    if (teacher.shape(0) != reference.shape(0))
        throw std::invalid_argument("teacher and reference scores have different lengths: " +
                                    std::to_string(teacher.shape(0)) + " vs " +
                                    std::to_string(reference.shape(0)));
    const int64_t n = teacher.shape(0);
    f64_array out(n);
    const double* t = teacher.data();
    const double* r = reference.data();
    double* o = out.mutable_data();
    {
        py::gil_scoped_release release;
        miniplm::difference_scores(t, r, o, n, 2, num_threads);
    }
    return out;
}

PYBIND11_MODULE(_cpp, m) {
    m.doc() = "C++ kernels of megatron-miniplm (Difference Sampling index builder)";
    m.def("difference_scores", &difference_scores, py::arg("teacher"), py::arg("reference"),
          py::arg("num_threads") = 0,
          "Per-instance difference score: reference mean NLL minus teacher mean NLL.\n"
          "Inputs are [N, 2] float64 arrays of (nll_sum, token_count); NaN where a count is 0.");
}
