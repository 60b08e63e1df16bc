"""A native encoder (megatron_miniplm._cpp.ByteLevelBPE) for GPT-2-style byte-level BPE
tokenizer.json files, token-for-token identical to HF `tokenizers` and faster.

Used by HFTokenizer when the tokenizer is one it reproduces exactly (`ineligible_reason`
says why not otherwise):

- no normalizer, no truncation or padding; the pre-tokenizer is ByteLevel without prefix
  space and with the GPT-2 regex, optionally after Digits(individual_digits=true);
- a BPE model without dropout, byte fallback, subword prefix or word suffix (ignore_merges
  is supported); a byte without a token in the vocabulary is dropped, as tokenizers does,
  unless the model has an unk token;
- every added token is special, so that (encode_special_tokens) it is plain text.

The C++ side pre-tokenizes and merges ASCII text; a text with other characters is cut at
positions where the pre-tokenizer always splits, and its non-ASCII pieces are encoded by
`tokenizers` (one batch call) and spliced in, so the result never depends on Unicode
tables. On first use a built-in set of samples is encoded both ways; any difference
disables the fast path with a warning. MINIPLM_FAST_BPE=0 disables it too.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

ENV_SWITCH = "MINIPLM_FAST_BPE"
# ASCII runs shorter than this between two non-ASCII pieces go to `tokenizers` with them.
MIN_ASCII_PIECE = 64

# Encoded both ways before the fast path is used: code, prose, whitespace runs, contractions,
# digits, punctuation, control characters, special-token text, long runs, mixed text.
SELF_CHECK_SAMPLES = (
    "",
    " ",
    "\n",
    "Hello world! It's a test, isn't it? We'll see: they're here, you've done it, I'm sure, he'd go.",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE ''s '''ll x'y 'x' 'Hello' \"quoted\" don't WON'T",
    "def f(x, y=2):\n    return x ** 2 + y  # square\n\n\nclass A(object):\n\tpass\r\n",
    "   leading and trailing spaces   ",
    "\n\n\n  \t \t\n   x\n \n",
    "\x0b\x0c\r\n \x0b x\x0cy\x1c\x1d\x1e\x1f\x00\x7f end \x01\x02\x03\x04\x05\x06 (\x04) a\x06b \x13\x14\x16 \x04",
    "digits 0 1 12 123 1234567890 3.14159 1e-9 0x1F 2024-01-01 v1.2.3 a1b2c3",
    "punctuation !!! ??? ... --- === +++ *** ### @@@ $$$ %%% ^^^ &&& ||| ~~~ `code` <tag/> {[()]}",
    "<|endoftext|> <|im_start|>user\nhi<|im_end|> </s> <eos>",
    "a" * 300 + " " * 300 + "=" * 200 + "\n" * 100 + "ab" * 150 + " " + "-" * 70,
    "naïve café: ünïcödé — “quotes” and 数据 模型, mixed with ASCII text around it; " * 3,
    "日本語のテキスト。 and then some ASCII words after the Japanese text, long enough to be a piece." * 2,
)


def _bytes_to_unicode() -> list[str]:
    """The ByteLevel table: byte b is written as the character table[b] in tokens."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = _bytes_to_unicode()
CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}

_PROCESSORS = {"ByteLevel", "TemplateProcessing", "RobertaProcessing", "BertProcessing"}


def _is_byte_level(pre: dict) -> bool:
    return (
        isinstance(pre, dict)
        and pre.get("type") == "ByteLevel"
        and pre.get("add_prefix_space") is False
        and pre.get("use_regex", True) is True  # absent in older files: true by default
    )


def _split_digits(pre) -> bool | None:
    """False: plain ByteLevel; True: Sequence[Digits(individual_digits), ByteLevel]; None: neither."""
    if _is_byte_level(pre):
        return False
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and isinstance(parts[0], dict) and parts[0].get("type") == "Digits"
                and parts[0].get("individual_digits") is True and _is_byte_level(parts[1])):
            return True
    return None


def _processor_ok(proc) -> bool:
    # Called with add_special_tokens=False, these add nothing and change no id.
    if proc is None:
        return True
    if proc.get("type") == "Sequence":
        return all(_processor_ok(p) for p in proc.get("processors") or [])
    return proc.get("type") in _PROCESSORS


def ineligible_reason(cfg: dict) -> str | None:
    """Why the parsed tokenizer.json `cfg` cannot use the fast encoder, or None if it can."""
    if cfg.get("normalizer") is not None:
        return "has a normalizer"
    if cfg.get("truncation") is not None or cfg.get("padding") is not None:
        return "has truncation or padding"
    if _split_digits(cfg.get("pre_tokenizer")) is None:
        return f"pre-tokenizer is not ByteLevel(add_prefix_space=false, use_regex=true): {cfg.get('pre_tokenizer')}"
    if not _processor_ok(cfg.get("post_processor")):
        return f"post-processor {cfg['post_processor'].get('type')} is not supported"
    model = cfg.get("model") or {}
    if model.get("type") != "BPE":
        return f"model is {model.get('type')}, not BPE"
    if model.get("dropout") not in (None, 0, 0.0):
        return "BPE dropout"
    if model.get("byte_fallback"):
        return "byte fallback"
    if model.get("continuing_subword_prefix") not in (None, "") or model.get("end_of_word_suffix") not in (None, ""):
        return "subword prefix or word suffix"
    vocab = model.get("vocab") or {}
    if model.get("unk_token") is not None and any(c not in vocab for c in BYTE_CHARS):
        return "a byte without a token would be encoded as unk"  # bytes without a token are dropped otherwise
    if any(not t.get("special", False) for t in cfg.get("added_tokens") or []):
        return "has non-special added tokens (they split the text before the model)"
    return None


def _merge_table(model: dict) -> np.ndarray:
    """[M, 3] int32 rows (left, right, merged id) in rank order."""
    vocab = model["vocab"]
    rows = np.empty((len(model.get("merges") or []), 3), dtype=np.int32)
    for r, m in enumerate(model.get("merges") or []):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError(f"merge {r} {m!r} is not two tokens")
            a, b = parts
        else:
            a, b = m
        rows[r] = (vocab[a], vocab[b], vocab[a + b])
    return rows


def _whole_words(vocab: dict) -> dict:
    out = {}
    for token, i in vocab.items():
        try:
            out[bytes(CHAR_BYTES[c] for c in token)] = i
        except KeyError:
            continue  # not a byte-level string: never a pre-token
    return out


class FastByteLevelBPE:
    """encode_flat over the native encoder, with `reference` (texts -> list of id lists,
    e.g. tokenizers' encode_batch_fast) for the non-ASCII pieces."""

    def __init__(self, cfg: dict, reference: Callable[[list[str]], list[list[int]]]):
        from megatron_miniplm import _cpp

        model = cfg["model"]
        vocab = model["vocab"]
        self.reference = reference
        self.bpe = _cpp.ByteLevelBPE(
            [vocab.get(c, -1) for c in BYTE_CHARS],
            _merge_table(model),
            split_digits=bool(_split_digits(cfg.get("pre_tokenizer"))),
            whole_words=_whole_words(vocab) if model.get("ignore_merges") else None,
        )

    def encode_flat(self, texts: Sequence[str], append_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(texts, (list, tuple)):
            texts = list(texts)
        tokens, lengths, hole_doc, hole_pos, fragments = self.bpe.encode_flat(
            texts, -1 if append_id is None else int(append_id), MIN_ASCII_PIECE)
        if fragments:
            ids = self.reference(fragments)
            sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(sizes.sum()))
            tokens = np.insert(tokens, np.repeat(hole_pos, sizes), values)
            np.add.at(lengths, hole_doc, sizes)
        return tokens, lengths

    def self_check(self) -> str | None:
        """None if every built-in sample encodes as `reference` does, else the first difference."""
        samples = list(SELF_CHECK_SAMPLES)
        want = self.reference(samples)
        tokens, lengths = self.encode_flat(samples)
        got = np.split(tokens, np.cumsum(lengths)[:-1]) if len(samples) else []
        for text, g, w in zip(samples, got, want):
            if g.tolist() != list(w):
                return f"{text[:60]!r}: fast {g.tolist()[:12]} vs tokenizers {list(w)[:12]}"
        return None


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def load_fast_bpe(path: str, reference: Callable[[list[str]], list[list[int]]]) -> FastByteLevelBPE | None:
    """The fast encoder for tokenizer.json `path`, or None (not eligible, disabled by
    MINIPLM_FAST_BPE=0, or failing its self-check: logged)."""
    if not enabled():
        log.info("%s: fast byte-level BPE disabled by %s", path, ENV_SWITCH)
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        reason = ineligible_reason(cfg)
        if reason is not None:
            log.debug("%s: fast byte-level BPE not used: %s", path, reason)
            return None
        fast = FastByteLevelBPE(cfg, reference)
    except Exception as e:  # a file tokenizers accepts but this reader does not: keep the old path
        log.warning("%s: fast byte-level BPE not used: %s: %s", path, type(e).__name__, e)
        return None
    diff = fast.self_check()
    if diff is not None:
        log.warning("%s: fast byte-level BPE disabled, it differs from tokenizers on %s", path, diff)
        return None
    return fast
