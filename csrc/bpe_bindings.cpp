// Python bindings of the byte-level BPE encoder (csrc/bpe.h): megatron_miniplm._cpp.ByteLevelBPE.
// Texts are read in place from the str objects (their compact 1-, 2- or 4-byte code
// units), with the GIL released while encoding.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bpe.h"

namespace py = pybind11;

namespace {

using miniplm::ByteLevelBpe;
using miniplm::Piece;
using miniplm::WordCache;

struct Text {
    int kind;  // PyUnicode_1BYTE_KIND, 2 or 4
    const void* data;
    size_t length;  // code points
    bool ascii;
};

struct Hole {  // a piece left to the reference encoder
    int64_t doc;
    int64_t token_pos;  // where its ids go in the flat output
    size_t begin, end;  // code points
};

class CacheLease {
public:
    explicit CacheLease(ByteLevelBpe& bpe) : bpe_(bpe), cache_(bpe.acquire_cache()) {}
    ~CacheLease() { bpe_.release_cache(std::move(cache_)); }
    WordCache* get() const { return cache_.get(); }

private:
    ByteLevelBpe& bpe_;
    std::unique_ptr<WordCache> cache_;
};

Text text_of(py::handle obj, size_t index) {
    if (!PyUnicode_Check(obj.ptr()))
        throw py::type_error("texts[" + std::to_string(index) + "]: expected str, got " +
                             std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    PyObject* o = obj.ptr();
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(o) != 0) throw py::error_already_set();
#endif
    return Text{static_cast<int>(PyUnicode_KIND(o)), PyUnicode_DATA(o), static_cast<size_t>(PyUnicode_GET_LENGTH(o)),
                PyUnicode_IS_ASCII(o) != 0};
}

// fn(code units): the text's data as uint8_t, uint16_t or uint32_t, by its width.
template <typename Fn>
void with_code_units(const Text& t, Fn&& fn) {
    if (t.kind == PyUnicode_1BYTE_KIND)
        fn(static_cast<const uint8_t*>(t.data));
    else if (t.kind == PyUnicode_2BYTE_KIND)
        fn(static_cast<const uint16_t*>(t.data));
    else
        fn(static_cast<const uint32_t*>(t.data));
}

template <typename CU>
void encode_mixed(const ByteLevelBpe& bpe, const CU* s, size_t n, int64_t doc, size_t min_ascii,
                  std::vector<Piece>& pieces, std::vector<uint8_t>& narrow, std::vector<int32_t>& out,
                  std::vector<Hole>& holes, WordCache* cache) {
    miniplm::split_mixed(s, n, min_ascii, pieces);
    for (const Piece& p : pieces) {
        if (!p.ascii) {
            holes.push_back({doc, static_cast<int64_t>(out.size()), p.begin, p.end});
            continue;
        }
        const uint8_t* bytes;
        if constexpr (sizeof(CU) == 1) {
            bytes = reinterpret_cast<const uint8_t*>(s) + p.begin;
        } else {
            narrow.resize(p.end - p.begin);
            for (size_t i = p.begin; i < p.end; ++i) narrow[i - p.begin] = static_cast<uint8_t>(s[i]);
            bytes = narrow.data();
        }
        bpe.encode(bytes, p.end - p.begin, out, cache);
    }
}

std::shared_ptr<ByteLevelBpe> make_bpe(const std::vector<int32_t>& byte_ids,
                                       py::array_t<int32_t, py::array::c_style | py::array::forcecast> merges,
                                       bool split_digits, py::object whole_words) {
    if (byte_ids.size() != 256) throw std::invalid_argument("byte_ids: expected 256 ids");
    if (merges.ndim() != 2 || (merges.shape(0) > 0 && merges.shape(1) != 3))
        throw std::invalid_argument("merges: expected an int32 array of shape [M, 3] (left, right, merged)");
    std::array<int32_t, 256> ids{};
    std::copy(byte_ids.begin(), byte_ids.end(), ids.begin());
    std::vector<ByteLevelBpe::Merge> m(merges.shape(0));
    auto r = merges.unchecked<2>();
    for (py::ssize_t i = 0; i < merges.shape(0); ++i) m[i] = {r(i, 0), r(i, 1), r(i, 2)};
    std::unordered_map<std::string, int32_t> words;
    const bool ignore_merges = !whole_words.is_none();
    if (ignore_merges)
        for (auto item : whole_words.cast<py::dict>())
            words.emplace(item.first.cast<std::string>(), item.second.cast<int32_t>());
    return std::make_shared<ByteLevelBpe>(ids, m, split_digits, ignore_merges, std::move(words));
}

// (tokens int32, lengths int64, hole_doc int64, hole_pos int64, fragments list[str])
py::tuple encode_flat(ByteLevelBpe& bpe, py::sequence texts, int64_t append_id, size_t min_ascii) {
    const size_t n = texts.size();
    std::vector<py::object> keep(n);  // the texts stay alive while the GIL is released
    std::vector<Text> in(n);
    for (size_t i = 0; i < n; ++i) {
        keep[i] = texts[i];
        in[i] = text_of(keep[i], i);
    }
    std::vector<int32_t> tokens;
    std::vector<int64_t> lengths(n);
    std::vector<Hole> holes;
    {
        py::gil_scoped_release release;
        CacheLease lease(bpe);
        size_t total = 0;
        for (const Text& t : in) total += t.length;
        tokens.reserve(total / 3 + n + 16);
        std::vector<Piece> pieces;
        std::vector<uint8_t> narrow;
        for (size_t d = 0; d < n; ++d) {
            const Text& t = in[d];
            const size_t before = tokens.size();
            if (t.ascii) {
                bpe.encode(static_cast<const uint8_t*>(t.data), t.length, tokens, lease.get());
            } else {
                with_code_units(t, [&](const auto* units) {
                    encode_mixed(bpe, units, t.length, d, min_ascii, pieces, narrow, tokens, holes, lease.get());
                });
            }
            if (append_id >= 0) tokens.push_back(static_cast<int32_t>(append_id));
            lengths[d] = static_cast<int64_t>(tokens.size() - before);
        }
    }
    py::array_t<int32_t> tok(static_cast<py::ssize_t>(tokens.size()));
    std::copy(tokens.begin(), tokens.end(), tok.mutable_data());
    py::array_t<int64_t> len(static_cast<py::ssize_t>(n));
    std::copy(lengths.begin(), lengths.end(), len.mutable_data());
    py::array_t<int64_t> hole_doc(static_cast<py::ssize_t>(holes.size()));
    py::array_t<int64_t> hole_pos(static_cast<py::ssize_t>(holes.size()));
    py::list fragments(holes.size());
    for (size_t h = 0; h < holes.size(); ++h) {
        const Hole& x = holes[h];
        hole_doc.mutable_data()[h] = x.doc;
        hole_pos.mutable_data()[h] = x.token_pos;
        if (x.begin == 0 && x.end == in[x.doc].length) {
            fragments[h] = keep[x.doc];
        } else {
            PyObject* sub = PyUnicode_Substring(keep[x.doc].ptr(), static_cast<Py_ssize_t>(x.begin),
                                                static_cast<Py_ssize_t>(x.end));
            if (!sub) throw py::error_already_set();
            fragments[h] = py::reinterpret_steal<py::object>(sub);
        }
    }
    return py::make_tuple(tok, len, hole_doc, hole_pos, fragments);
}

const uint8_t* ascii_bytes(py::handle text, size_t& n) {
    const Text t = text_of(text, 0);
    if (!t.ascii) throw std::invalid_argument("text is not ASCII");
    n = t.length;
    return static_cast<const uint8_t*>(t.data);
}

}  // namespace

void bind_bpe(py::module_& m) {
    py::class_<ByteLevelBpe, std::shared_ptr<ByteLevelBpe>>(m, "ByteLevelBPE", R"doc(
Byte-level BPE encoder (GPT-2 pre-tokenizer regex, BPE by merge rank, word cache) for
ASCII text; other text is cut into pieces for the reference encoder (see encode_flat).

byte_ids: 256 ids, the one-byte token of each byte (-1: none, the byte is dropped). merges: int32 [M, 3] rows (left,
right, merged) in rank order. split_digits: the pre-tokenizer is Sequence[Digits
(individual_digits), ByteLevel]. whole_words: None, or (ignore_merges) a dict bytes -> id
of words taken whole before merging.)doc")
        .def(py::init(&make_bpe), py::arg("byte_ids"), py::arg("merges"), py::arg("split_digits") = false,
             py::arg("whole_words") = py::none())
        .def("encode_flat", &encode_flat, py::arg("texts"), py::arg("append_id") = -1, py::arg("min_ascii") = 64,
             R"doc(Encodes a sequence of str with the GIL released. Returns (tokens int32, lengths int64,
hole_doc int64, hole_pos int64, fragments list[str]): every text's ids concatenated, each
followed by append_id (if >= 0, counted in lengths), except the fragments (non-ASCII
pieces, or whole non-ASCII texts) which are left to the caller: fragment h belongs to
text hole_doc[h] and its ids go at tokens[hole_pos[h]] (before any later fragment at
the same position), adding to that text's length.)doc")
        .def(
            "pre_tokenize",
            [](ByteLevelBpe& bpe, py::handle text) {
                size_t n;
                const uint8_t* s = ascii_bytes(text, n);
                return bpe.pre_tokenize(s, n);
            },
            py::arg("text"), "[begin, end) code-point offsets of the pre-tokens of one ASCII str.")
        .def_property_readonly("split_digits", &ByteLevelBpe::split_digits);

    m.def(
        "bpe_split_mixed",
        [](py::handle text, size_t min_ascii) {
            const Text t = text_of(text, 0);
            std::vector<Piece> pieces;
            with_code_units(t, [&](const auto* units) { miniplm::split_mixed(units, t.length, min_ascii, pieces); });
            py::list out;
            for (const Piece& p : pieces) out.append(py::make_tuple(p.begin, p.end, p.ascii));
            return out;
        },
        py::arg("text"), py::arg("min_ascii") = 64,
        "The pieces (begin, end, ascii) ByteLevelBPE.encode_flat cuts a str into (code points).");
}
