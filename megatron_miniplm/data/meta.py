"""The PREFIX.meta.json contract that later stages (scoring, selection, training) rely on.

A dataset is PREFIX.bin / PREFIX.idx (an indexed dataset in megatron-core's format, read
and written by megatron_miniplm.data.indexed_dataset), PREFIX.domains.npy
(int32 domain id per instance) and PREFIX.meta.json. A sharded dataset is a top-level
PREFIX.meta.json whose "shards" lists relative shard prefixes, each a dataset as above;
its "fingerprint" is the sha256 of the shards' fingerprints joined by newlines.
The meta file is renamed into place last, so its presence means the dataset is complete.
"""
from __future__ import annotations

import json
import os
from typing import Any

from megatron_miniplm.atomic_io import disk_space
from megatron_miniplm.data.tokenizer import file_sha256
from megatron_miniplm.errors import UserError

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version", "fingerprint", "num_instances", "num_tokens", "instance_mode",
    "seq_length", "tokenizer", "domains", "domain_stats", "inputs", "skipped",
)
TOKENIZER_KEYS = ("path", "name", "sha256", "vocab_size", "eod_id", "pad_id")


class DatasetMetaError(UserError, ValueError):
    pass


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def read_dataset_meta(prefix: str) -> dict[str, Any]:
    """The parsed meta.json of a dataset (or of a sharded dataset's top level)."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: dataset meta file not found (is {prefix!r} a prefix written by tools/preprocess_data.py?)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetMetaError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DatasetMetaError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(meta, dict):
        raise DatasetMetaError(f"{path}: expected a JSON object, got a {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetMetaError(f"{path}: missing keys {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DatasetMetaError(f"{path}: format_version {meta['format_version']!r}, this code reads {FORMAT_VERSION}")
    if not isinstance(meta["tokenizer"], dict) or any(k not in meta["tokenizer"] for k in TOKENIZER_KEYS):
        raise DatasetMetaError(f"{path}: 'tokenizer' must have keys {', '.join(TOKENIZER_KEYS)}")
    if "shards" in meta and (not isinstance(meta["shards"], list) or not all(isinstance(s, str) for s in meta["shards"])):
        raise DatasetMetaError(f"{path}: 'shards' must be a list of relative prefixes")
    return meta


def dataset_prefixes(prefix: str) -> list[str]:
    """The prefixes holding .bin/.idx files: the shards of a sharded dataset, else [prefix]."""
    meta = read_dataset_meta(prefix)
    if "shards" not in meta:
        return [prefix]
    base = os.path.dirname(prefix)
    return [os.path.join(base, s) for s in meta["shards"]]


def idx_fingerprint(idx_path: str) -> str:
    """sha256 of the .idx bytes: cheap to compute, and it changes whenever any instance
    length or the token dtype does (the .bin is not hashed: it can be hundreds of GB)."""
    return file_sha256(idx_path)


def verify_fingerprint(prefix: str) -> None:
    """Raise unless every .idx of the dataset still matches its recorded fingerprint."""
    for p in dataset_prefixes(prefix):
        want = read_dataset_meta(p)["fingerprint"]
        got = idx_fingerprint(p + ".idx")
        if got != want:
            raise DatasetMetaError(f"{p}.idx: fingerprint {got[:12]}... does not match {meta_path(p)} ({want[:12]}...)")


def write_json(path: str, obj: dict) -> None:
    with disk_space(path), open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
