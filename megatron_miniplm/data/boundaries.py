"""Sentence-boundary tokens, derived from the tokenizer's own vocabulary.

MiniPLM cuts an instance after the last sentence boundary it contains: an EOD, a token
containing a newline (line feed, carriage return, U+2028 or U+2029), or a sentence-final
punctuation token followed by a token that begins with a space (or a tab). Which ids are
which depends on the tokenizer, so the three sets are computed once from every token's
decoded text and then applied as lookup tables, which turns boundary detection into two
vectorized gathers per document.
"""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np

from megatron_miniplm.data.tokenizer import Tokenizer

SENTENCE_FINAL = frozenset(".!?…‼⁇⁈⁉。！？｡؟۔।॥")
# Closing marks that may follow the final mark inside one token: `."`, `.)`, `?»`.
CLOSERS = frozenset("\"')]}»”’」』")
NEWLINES = ("\n", "\r", "\u2028", "\u2029")


def is_sentence_final(surface: str) -> bool:
    """Punctuation only (ignoring surrounding spaces), ending in a sentence-final mark."""
    core = surface.strip()
    if not core or not all(unicodedata.category(c).startswith("P") for c in core):
        return False
    core = core.rstrip("".join(CLOSERS))
    return bool(core) and core[-1] in SENTENCE_FINAL


@dataclass(frozen=True)
class BoundaryTables:
    """bool[vocab_size] tables; `ends`: always a boundary (EOD, newline tokens)."""

    ends: np.ndarray
    final_punct: np.ndarray
    space_start: np.ndarray

    @classmethod
    def from_surfaces(cls, surfaces: list[str], eod_id: int) -> "BoundaryTables":
        n = len(surfaces)
        ends = np.zeros(n, dtype=bool)
        final_punct = np.zeros(n, dtype=bool)
        space_start = np.zeros(n, dtype=bool)
        for i, s in enumerate(surfaces):
            if not s:
                continue
            ends[i] = any(nl in s for nl in NEWLINES)
            final_punct[i] = is_sentence_final(s)
            space_start[i] = s[0] in " \t"
        ends[eod_id] = True
        space_start[eod_id] = False
        return cls(ends, final_punct, space_start)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "BoundaryTables":
        return cls.from_surfaces(tokenizer.token_surfaces(), tokenizer.eod_id)

    def flags(self, tokens: np.ndarray) -> np.ndarray:
        """flags[i]: an instance may end after tokens[i]. The punctuation rule looks at
        tokens[i + 1], so call it on whole documents (each ends with EOD, itself a
        boundary) or on a concatenation of them."""
        flags = self.ends[tokens]
        if len(tokens) > 1:
            flags[:-1] |= self.final_punct[tokens[:-1]] & self.space_start[tokens[1:]]
        return flags

    def summary(self) -> dict:
        """Counts and a hash of the tables, for the dataset's meta.json."""
        h = hashlib.sha256()
        for t in (self.ends, self.final_punct, self.space_start):
            h.update(np.packbits(t).tobytes())
        return {
            "newline_or_eod": int(self.ends.sum()),
            "sentence_final": int(self.final_punct.sum()),
            "space_start": int(self.space_start.sum()),
            "sha256": h.hexdigest(),
        }
