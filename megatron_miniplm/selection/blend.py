"""The sampled blend: which instances of which dataset shards to train on, in what order.

    BLEND.npy        int64 [K, 2], row j = (shard index, instance index in that shard)
    BLEND.meta.json  {"format_version": 1, "kind": "miniplm_sampled_blend",
                      "datasets": [{"prefix", "fingerprint", ...}, ...]   one per shard,
                      prefixes relative to the blend's directory (or absolute),
                      "scores", "method", "alpha" | "keep_tokens", "order", "seed",
                      "num_selected", "tokens_kept", "num_instances_total", "tokens_total"}

A blend indexes the corpus instead of copying it: K x 16 bytes, whatever the instance
length. The trainer reads it through `load_blend`; `is_blend` tells a blend prefix from
a dataset prefix (a dataset has no "kind": "miniplm_sampled_blend" in its meta).
"""
from __future__ import annotations

import json
import os

import numpy as np

from megatron_miniplm.atomic_io import NpyWithMeta
from megatron_miniplm.selection.shards import DatasetError, open_indexed, read_dataset_meta
from megatron_miniplm.errors import UserError

FORMAT_VERSION = 1
KIND = "miniplm_sampled_blend"


class BlendError(UserError, ValueError):
    """A blend that cannot be used; the message names the file and the reason."""


def blend_paths(prefix: str) -> tuple[str, str]:
    return prefix + ".npy", prefix + ".meta.json"


def is_blend(prefix: str) -> bool:
    """True if PREFIX.meta.json declares a sampled blend (never raises)."""
    _, meta_path = blend_paths(prefix)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == KIND


def relative_prefix(blend_prefix: str, dataset_prefix: str) -> str:
    """How a blend names a dataset: relative to the blend's directory."""
    base = os.path.dirname(os.path.abspath(blend_prefix))
    return os.path.relpath(os.path.abspath(dataset_prefix), base)


def dataset_prefixes(blend_prefix: str, meta: dict) -> list[str]:
    """The shard prefixes a blend indexes, as paths usable from the current directory."""
    base = os.path.dirname(blend_prefix)
    return [d["prefix"] if os.path.isabs(d["prefix"]) else os.path.join(base, d["prefix"]) for d in meta["datasets"]]


class BlendWriter(NpyWithMeta):
    """Writes BLEND.npy in place (the C++ builder fills `array`), then its meta."""

    def __init__(self, prefix: str, rows: int):
        super().__init__(*blend_paths(prefix), np.int64, (rows, 2))


def load_blend(prefix: str, *, mmap: bool = True, verify: bool = False) -> tuple[np.ndarray, dict]:
    """(rows int64 [K, 2] of (shard, instance), memory-mapped read-only; meta).

    verify=True also checks that every dataset still has the recorded fingerprint and
    instance count and that every row points inside its shard (O(K))."""
    npy_path, meta_path = blend_paths(prefix)
    if not os.path.isfile(meta_path):
        raise BlendError(f"{meta_path}: blend meta file not found")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BlendError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise BlendError(f"{meta_path}: not a sampled blend (kind is not {KIND!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BlendError(f"{meta_path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    for key in ("datasets", "num_selected"):
        if key not in meta:
            raise BlendError(f"{meta_path}: missing key {key!r}")
    if not os.path.isfile(npy_path):
        raise BlendError(f"{npy_path}: blend array not found")
    k = meta["num_selected"]
    try:
        rows = np.load(npy_path, mmap_mode="r" if mmap and k else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BlendError(f"{npy_path}: not a readable .npy file ({e})") from None
    if rows.dtype != np.int64 or rows.ndim != 2 or rows.shape[1] != 2:
        raise BlendError(f"{npy_path}: expected int64 [K, 2] (shard, instance), got {rows.dtype} {rows.shape}")
    if rows.shape[0] != k:
        raise BlendError(f"{npy_path}: {rows.shape[0]} rows, but {meta_path} says num_selected={k}")
    if verify:
        _verify(prefix, rows, meta)
    return rows, meta


def _verify(prefix: str, rows: np.ndarray, meta: dict) -> None:
    npy_path, meta_path = blend_paths(prefix)
    sizes = []
    for entry, path in zip(meta["datasets"], dataset_prefixes(prefix, meta)):
        try:
            dmeta = read_dataset_meta(path)
        except DatasetError as e:
            raise BlendError(f"{meta_path}: dataset {entry['prefix']!r}: {e}") from None
        if dmeta.get("fingerprint") != entry.get("fingerprint"):
            raise BlendError(f"{meta_path}: dataset {entry['prefix']!r} has changed since the blend was built "
                             "(fingerprint differs)")
        sizes.append(int(dmeta["num_instances"]))
    if len(rows):
        shard = np.asarray(rows[:, 0])
        if shard.min() < 0 or shard.max() >= len(sizes):
            raise BlendError(f"{npy_path}: shard index outside the {len(sizes)} datasets of the blend")
        local_max = np.full(len(sizes), -1, dtype=np.int64)
        np.maximum.at(local_max, shard, np.asarray(rows[:, 1]))
        if np.asarray(rows[:, 1]).min() < 0 or np.any(local_max >= np.asarray(sizes)):
            raise BlendError(f"{npy_path}: an instance index is outside its shard")


class BlendReader:
    """Random access to the tokens of a blend's instances, reading the shards in place."""

    def __init__(self, prefix: str, verify: bool = True):
        self.rows, self.meta = load_blend(prefix, verify=verify)
        self.prefixes = dataset_prefixes(prefix, self.meta)
        self._shards = [open_indexed(p) for p in self.prefixes]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, j: int) -> np.ndarray:
        s, i = (int(v) for v in self.rows[j])
        return self._shards[s][i]
