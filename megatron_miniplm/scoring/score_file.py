"""Score files: per-instance (nll_sum, token_count) of one model over one dataset shard.

    SCORES.npy        float64 [N, 2], row i = (sum of masked token NLL, number of masked
                      tokens) of instance i, in dataset order
    SCORES.meta.json  {"format_version": 1, "dataset_fingerprint", "num_instances",
                       "model": {...}, "sha256": of SCORES.npy, ...}

Sums and counts (not means) are stored so that scores can be merged and re-weighted
exactly. Writes are atomic: both files go to temporary names first; any old meta is
removed before the new .npy is renamed into place and the new meta is renamed last, so
a reader never pairs a meta with the wrong array. One score file per dataset shard.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from megatron_miniplm.atomic_io import NpyWithMeta
from megatron_miniplm.data.tokenizer import file_sha256  # noqa: F401  (re-exported)
from megatron_miniplm.errors import UserError

FORMAT_VERSION = 1
COLUMNS = ("nll_sum", "token_count")


class ScoreFileError(UserError, ValueError):
    """A score file that cannot be used; the message names the file and the reason."""


def score_paths(prefix: str) -> tuple[str, str]:
    return prefix + ".npy", prefix + ".meta.json"


def _check_meta_in(meta: Any, where: str) -> dict:
    if not isinstance(meta, dict):
        raise ScoreFileError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    fp = meta.get("dataset_fingerprint")
    if not isinstance(fp, str) or not fp:
        raise ScoreFileError(f"{where}: meta needs 'dataset_fingerprint' (the sha256 in the dataset's meta.json)")
    if not isinstance(meta.get("model"), dict):
        raise ScoreFileError(f"{where}: meta needs 'model', a dict identifying the scoring model")
    return meta


class ScoreFileWriter(NpyWithMeta):
    """Streams scores of a large shard into a memory-mapped temporary .npy (`array`);
    `commit()` renames it into place with its meta. Use when [N, 2] does not fit in memory twice."""

    def __init__(self, prefix: str, num_instances: int, meta: dict):
        self.prefix = prefix
        npy_path, meta_path = score_paths(prefix)
        self.meta = dict(_check_meta_in(meta, meta_path))
        if num_instances < 0:
            raise ScoreFileError(f"{npy_path}: num_instances must be >= 0, got {num_instances}")
        declared = self.meta.get("num_instances", num_instances)
        if declared != num_instances:
            raise ScoreFileError(f"{meta_path}: meta says num_instances={declared}, the array has {num_instances} rows")
        version = self.meta.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ScoreFileError(f"{meta_path}: format_version {version!r}, this code writes {FORMAT_VERSION}")
        out_dir = os.path.dirname(os.path.abspath(npy_path))
        if not os.path.isdir(out_dir):
            raise ScoreFileError(f"{npy_path}: output directory {out_dir} does not exist")
        self.num_instances = num_instances
        super().__init__(npy_path, meta_path, np.float64, (num_instances, 2))

    def commit(self) -> dict:
        meta = {**self.meta, "format_version": FORMAT_VERSION, "num_instances": self.num_instances,
                "columns": list(COLUMNS), "sha256": file_sha256(self.close())}
        super().commit(meta, sort_keys=True, ensure_ascii=True)
        return meta

    def __enter__(self) -> "ScoreFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def save_scores(prefix: str, array: np.ndarray, meta: dict) -> dict:
    """Writes PREFIX.npy and PREFIX.meta.json atomically; returns the meta written
    (with format_version, num_instances, columns and the .npy's sha256 filled in)."""
    npy_path, meta_path = score_paths(prefix)
    arr = np.asarray(array)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ScoreFileError(f"{npy_path}: expected an array of shape [N, 2] (nll_sum, token_count), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ScoreFileError(f"{npy_path}: expected a numeric array, got dtype {arr.dtype}")
    with ScoreFileWriter(prefix, arr.shape[0], meta) as w:
        w.array[...] = arr
        return w.commit()


def load_scores(prefix: str, *, mmap: bool = True, verify_sha256: bool = False) -> tuple[np.ndarray, dict]:
    """(scores [N, 2] float64, memory-mapped read-only; meta). Raises ScoreFileError
    naming the file for anything missing, malformed or inconsistent."""
    npy_path, meta_path = score_paths(prefix)
    if not os.path.isfile(meta_path):
        raise ScoreFileError(f"{meta_path}: score meta file not found (score files come in pairs: "
                             f"{os.path.basename(npy_path)} + {os.path.basename(meta_path)})")
    if not os.path.isfile(npy_path):
        raise ScoreFileError(f"{npy_path}: score array not found")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScoreFileError(f"{meta_path}: not valid JSON ({e})") from None
    _check_meta_in(meta, meta_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ScoreFileError(f"{meta_path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    n = meta.get("num_instances")
    if not isinstance(n, int) or n < 0:
        raise ScoreFileError(f"{meta_path}: 'num_instances' must be a non-negative integer, got {n!r}")
    try:
        arr = np.load(npy_path, mmap_mode="r" if mmap and n > 0 else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ScoreFileError(f"{npy_path}: not a readable .npy file ({e})") from None
    if arr.dtype != np.float64 or arr.ndim != 2 or arr.shape[1] != 2:
        raise ScoreFileError(f"{npy_path}: expected float64 [N, 2] (nll_sum, token_count), got {arr.dtype} {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ScoreFileError(f"{npy_path}: array is not C-contiguous (Fortran-ordered .npy)")
    if arr.shape[0] != n:
        raise ScoreFileError(f"{npy_path}: {arr.shape[0]} rows, but {meta_path} says num_instances={n}")
    if verify_sha256 and "sha256" in meta and file_sha256(npy_path) != meta["sha256"]:
        raise ScoreFileError(f"{npy_path}: sha256 differs from {meta_path} (array changed after it was written)")
    return arr, meta


def check_scores_match(score_prefix: str, score_meta: dict, dataset_prefix: str, dataset_meta: dict) -> None:
    """Raises unless the score file was computed over exactly this dataset shard."""
    _, meta_path = score_paths(score_prefix)
    want = dataset_meta.get("fingerprint")
    got = score_meta.get("dataset_fingerprint")
    if got != want:
        raise ScoreFileError(
            f"{meta_path}: scores of another dataset: dataset_fingerprint {str(got)[:16]}... but "
            f"{dataset_prefix}.meta.json has fingerprint {str(want)[:16]}..."
        )
    if score_meta.get("num_instances") != dataset_meta.get("num_instances"):
        raise ScoreFileError(
            f"{meta_path}: {score_meta.get('num_instances')} instances scored, but {dataset_prefix} has "
            f"{dataset_meta.get('num_instances')}"
        )
