"""Instance construction: documents (ending in EOD) in, training instances out.

miniplm   one token buffer per domain; when it holds seq_length + 1 tokens, the instance
          ends after the last sentence boundary inside that window (or is the whole
          window if it has none) and the rest carries over (miniplm-method.md, Instances).
packed    the same per-domain buffers, cut at exactly seq_length + 1 tokens.
document  one instance per document (classic Megatron).

In the buffered modes, the instances of a domain, concatenated, are exactly that domain's
token stream: nothing is padded, and the last instance of each domain (emitted by `flush`)
may be shorter. With the EOD id known, every instance holds a prediction that counts (a
token other than EOD before its last one), which scoring and training need: a cut is not
taken where it would leave an instance without one, and a domain's stream that ends in a
lone carried-over EOD drops it (the last document then ends with its instance).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class InstanceMode(str, Enum):
    MINIPLM = "miniplm"
    PACKED = "packed"
    DOCUMENT = "document"


def cut_length(flags: np.ndarray, max_len: int, earliest: int = 1) -> int:
    """Length of the next instance given the boundary flags of a full window of
    `max_len` tokens: up to and including the last boundary at position >= `earliest`
    (an earlier cut would leave an instance with nothing to predict: position 1 past the
    window's first token other than EOD), else all."""
    window = flags[earliest:max_len]
    if not window.any():
        return max_len
    return earliest + len(window) - int(np.argmax(window[::-1]))


@dataclass
class _DomainBuffer:
    tokens: list[np.ndarray] = field(default_factory=list)
    flags: list[np.ndarray] = field(default_factory=list)
    size: int = 0


@dataclass
class Instances:
    """A batch of instances: one flat token array, a length and a domain id each."""

    tokens: np.ndarray
    lengths: np.ndarray  # int64
    domains: np.ndarray  # int32

    @classmethod
    def concat(cls, parts: list[np.ndarray], domains: list[int], dtype=np.int32) -> "Instances":
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
        return cls(tokens, lengths, np.asarray(domains, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.lengths)


class InstanceBuilder:
    """Feed documents in input order with `add`; collect instances as they complete."""

    def __init__(self, mode: InstanceMode | str, seq_length: int, eod_id: int | None = None):
        self.mode = InstanceMode(mode)
        self.eod_id = eod_id
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.max_len = seq_length + 1
        self._buffers: dict[int, _DomainBuffer] = {}
        self._out_tokens: list[np.ndarray] = []
        self._out_domains: list[int] = []

    def add(self, tokens: np.ndarray, domain: int, flags: np.ndarray | None = None) -> None:
        """One document, EOD included. `flags` (boundary flags) is needed in miniplm mode."""
        if self.mode is InstanceMode.DOCUMENT:
            self._emit(tokens, domain)
            return
        if self.mode is InstanceMode.MINIPLM and flags is None:
            raise ValueError("miniplm mode needs the boundary flags of each document")
        buf = self._buffers.setdefault(domain, _DomainBuffer())
        buf.tokens.append(tokens)
        if flags is not None:
            buf.flags.append(flags)
        buf.size += len(tokens)
        if buf.size >= self.max_len:
            self._cut(buf, domain)

    def _cut(self, buf: _DomainBuffer, domain: int) -> None:
        tokens = np.concatenate(buf.tokens) if len(buf.tokens) > 1 else buf.tokens[0]
        flags = None
        if self.mode is InstanceMode.MINIPLM:
            flags = np.concatenate(buf.flags) if len(buf.flags) > 1 else buf.flags[0]
        start, n = 0, len(tokens)
        while n - start >= self.max_len:
            length = self.max_len if flags is None else cut_length(
                flags[start:start + self.max_len], self.max_len, self._earliest_cut(tokens, start))
            self._emit(tokens[start:start + length], domain)
            start += length
        # Copy the carry-over so a long document's array is not kept alive by a view.
        buf.tokens = [tokens[start:].copy()] if start < n else []
        buf.flags = [flags[start:].copy()] if flags is not None and start < n else []
        buf.size = n - start

    def _earliest_cut(self, tokens: np.ndarray, start: int) -> int:
        """1 past the first token from `start` that is not EOD (1 where EOD is unknown)."""
        first = start
        if self.eod_id is not None:
            while first < len(tokens) - 1 and tokens[first] == self.eod_id:
                first += 1
        return first - start + 1

    def _emit(self, tokens: np.ndarray, domain: int) -> None:
        self._out_tokens.append(tokens)
        self._out_domains.append(domain)

    def take(self) -> Instances:
        """The instances completed since the last call, in completion order."""
        out = Instances.concat(self._out_tokens, self._out_domains)
        self._out_tokens, self._out_domains = [], []
        return out

    def flush(self) -> Instances:
        """End of input: each domain's remainder becomes a last (short) instance, in
        domain id order (but a remainder without a prediction that counts: EODs only)."""
        for domain in sorted(self._buffers):
            buf = self._buffers[domain]
            rest = np.concatenate(buf.tokens) if buf.size else None
            if rest is not None and (self.eod_id is None or np.any(rest[:-1] != self.eod_id)):
                self._emit(rest, domain)
        self._buffers.clear()
        return self.take()
