"""The tokens on the other side of a cut inside a document, for decoding an instance's
edges as text.

Preprocessing cuts a domain's token stream into instances wherever the window is full,
so a document may continue from one instance into the next of its domain, and the cut
may fall inside a character (a byte-level token holds part of its UTF-8 bytes) or just
before a word whose leading space a decoder drops at the start of a text
(sentencepiece). Decoding such an edge alone gives U+FFFD or loses the space; decoding
it with a few tokens of the neighbouring instance gives the text exactly
(`edge_texts`).

The neighbours are those of the stream the instances were cut from: for a dataset
written by tools/preprocess_data.py (its shards, consecutive in the blend), the previous
or next instance of the same domain in dataset order; for a part of a D_ref split (tools/split_dataset.py), the
same in the split's source dataset, found through the part's source indices. A neighbour
that cannot be read (a split's source moved or rewritten) gives no context, and that
edge is decoded alone, as are those of instances that were not cut in dataset order (a
materialized selection, generated sequences).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np

from megatron_miniplm.data.meta import dataset_prefixes
from megatron_miniplm.selection.shards import DatasetError, domain_table, open_shards, read_dataset_meta, shard_offsets

log = logging.getLogger(__name__)

CONTEXT_TOKENS = 16  # more than the bytes of one character, and a word's leading space
_SCAN, _MAX_SCAN = 64, 1 << 16  # instances searched per step for a neighbour of the same domain (growing)


class _Stream:
    """A dataset's instances in the order they were cut, with their (global) domain ids."""

    def __init__(self, shards: list):
        _, maps = domain_table(shards)
        self.shards = shards
        self.offsets = shard_offsets(shards)
        self.domains = np.concatenate([s.mapped_domains(m) for s, m in zip(shards, maps)]) if shards else \
            np.zeros(0, np.int32)

    def tokens(self, g: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return self.shards[s].tokens(g - int(self.offsets[s]))

    def neighbour(self, g: int, step: int) -> Optional[int]:
        """The nearest instance before (step -1) or after (step +1) instance g with its domain."""
        d, at, size = self.domains[g], g + step, _SCAN
        while 0 <= at < len(self.domains):
            lo, hi = (at, min(at + size, len(self.domains))) if step > 0 else (max(at - size + 1, 0), at + 1)
            hits = np.flatnonzero(self.domains[lo:hi] == d)
            if hits.size:
                return lo + int(hits[0] if step > 0 else hits[-1])
            at, size = (hi if step > 0 else lo - 1), min(size * 8, _MAX_SCAN)
        return None


class Neighbours:
    """For an instance of the blend's shards: the tokens just before and after it in its
    document, where the document continues across its first or last token."""

    def __init__(self, shards: list, eod: int):
        self.eod = eod
        self._where: list[tuple[Optional[_Stream], Optional[np.ndarray], int]] = []
        sources: dict = {}
        for run, group in itertools.groupby(shards, key=lambda s: _run_of(s.meta)):
            group = list(group)
            if run is not None:  # the shards of one preprocessing run: one stream
                stream = _Stream(group)
                self._where += [(stream, None, int(at)) for at in stream.offsets[:-1]]
                continue
            for s in group:
                self._place(s, sources)

    def _place(self, s, sources: dict) -> None:
        """A shard that preprocessing did not write: a split's part reads its source's stream."""
        split = s.meta.get("split")
        if not split:
            self._where.append((None, None, 0))
            return
        source = split.get("source_prefix", "")
        if source not in sources:
            sources[source] = _open_source(source, split.get("source_fingerprint"), s.prefix)
        index = np.load(s.prefix + ".source_index.npy", mmap_mode="r") if sources[source] else None
        self._where.append((sources[source], index, 0))

    def around(self, s: int, i: int, tokens: np.ndarray) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """(the last tokens of the document before instance i of shard s, or None where the
        instance starts a document; the first tokens after it, or None where it ends one)."""
        stream, index, offset = self._where[s]
        if stream is None:
            return None, None
        g = int(index[i]) if index is not None else offset + i
        left = right = None
        if len(tokens) and tokens[0] != self.eod:
            prev = stream.neighbour(g, -1)
            before = stream.tokens(prev) if prev is not None else None
            if before is not None and len(before) and before[-1] != self.eod:
                left = np.asarray(before[-CONTEXT_TOKENS:])
        if len(tokens) and tokens[-1] != self.eod:
            nxt = stream.neighbour(g, +1)
            if nxt is not None:
                after = np.asarray(stream.tokens(nxt)[:CONTEXT_TOKENS])
                cut = np.flatnonzero(after == self.eod)
                right = after[:cut[0]] if cut.size else after
        return left, right


def _cut_here(meta: dict) -> bool:
    """Whether a dataset's instances were cut by preprocessing in this order: not a split's
    part (see its source), a selection's materialized subset or generated sequences."""
    return not any(meta.get(k) for k in ("split", "selection", "generation"))


def _run_of(meta: dict) -> Optional[str]:
    """What the shards of one preprocessing run share (None: not cut by preprocessing), so
    that consecutive shards of one run form one stream and two datasets never do."""
    if not _cut_here(meta):
        return None
    return json.dumps([meta.get(k) for k in ("inputs", "tokenizer", "seq_length", "instance_mode", "json_key",
                                            "domain_key")], sort_keys=True)


def _open_source(prefix: str, fingerprint: Optional[str], part: str) -> Optional[_Stream]:
    """The split's source dataset, or None (logged) where it is gone, was rewritten or was
    not cut by preprocessing."""
    try:
        meta = read_dataset_meta(prefix) if os.path.exists(prefix + ".meta.json") else {}
        if meta.get("fingerprint") == fingerprint and _cut_here(meta):
            return _Stream(open_shards(dataset_prefixes(prefix)))
    except (DatasetError, FileNotFoundError, ValueError):
        pass
    log.warning("%s: the split's source %s is missing, was rewritten or is not a preprocessed dataset: instance "
                "edges inside a document are decoded without their neighbours", part, prefix)
    return None


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (a binary search over `startswith`)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(b[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def edge_texts(decode_batch, pieces: Sequence[np.ndarray], lefts: Sequence[Optional[np.ndarray]],
               rights: Sequence[Optional[np.ndarray]]) -> list[str]:
    """The text of each piece, decoded with its neighbouring tokens (None: a document edge).

    A piece's text is what decoding it after its left context adds, less the end that
    decoding its right context after it changes: a character cut by an instance edge
    belongs wholly to the piece holding its last byte, and a leading space to the piece of
    its word, so the texts of a document's pieces join to the document's text. The right
    edge is found on the piece's last tokens, so that each piece is decoded whole once."""
    joined = [np.concatenate([x for x in (l, p) if x is not None]) for l, p in zip(lefts, pieces)]
    texts = decode_batch(joined)
    with_left = [k for k, l in enumerate(lefts) if l is not None]
    with_right = [k for k, r in enumerate(rights) if r is not None and len(r)]
    before = decode_batch([lefts[k] for k in with_left]) if with_left else []
    tails = [pieces[k][-CONTEXT_TOKENS:] for k in with_right]
    alone = decode_batch(tails) if with_right else []
    after = decode_batch([np.concatenate([t, rights[k]]) for t, k in zip(tails, with_right)]) if with_right else []
    start = [0] * len(texts)
    end = [len(t) for t in texts]
    for k, t in zip(with_left, before):
        start[k] = _common_prefix(t, texts[k])
    for k, a, t in zip(with_right, alone, after):
        end[k] -= len(a) - _common_prefix(a, t)
    return [t[a:b] for t, a, b in zip(texts, start, end)]
