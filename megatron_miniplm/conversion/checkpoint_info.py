"""The converted-checkpoint directory: info file, atomic writes, finding a megatron checkpoint.

A megatron checkpoint directory holds the dist-checkpoint shards,
``model_config.json`` (the ModelConfig), ``tokenizer/`` and
``checkpoint_info.json``::

    {"format_version": 1, "source": "/abs/path", "source_format": "hf" | "gguf",
     "architecture": "Qwen2ForCausalLM", "dtype": "fp32",
     "tokenizer": {"path": "tokenizer/tokenizer.json", "sha256": ..., "vocab_size": ...,
                   "eod_id": ..., "eod_token": ...} | null,
     "parallel": {"tensor_model_parallel_size": N, "pipeline_model_parallel_size": M}}

``parallel`` records the layout the checkpoint was validated for; the shards
reshard on load, so any layout that divides the model loads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Optional

from megatron_miniplm.atomic_io import disk_space
from megatron_miniplm.dist_checkpoint import LATEST_FILE, MODEL_CONFIG_FILE, latest_checkpoint
from megatron_miniplm.conversion.errors import ConversionError

INFO_FILE = "checkpoint_info.json"
FORMAT_VERSION = 1
LATEST_FILES = (LATEST_FILE, "latest")


def write_info(directory: str, info: dict) -> None:
    with open(os.path.join(directory, INFO_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **info}, f, indent=2)
        f.write("\n")


def read_info(directory: str) -> Optional[dict]:
    path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        info = json.load(f)
    if info.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{path}: unknown format_version {info.get('format_version')}")
    return info


def check_destination(path: str, overwrite: bool) -> None:
    """Fail before any work when ``--save`` would clobber something."""
    if os.path.isfile(path):
        raise ConversionError(f"--save {path} is a file")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConversionError(f"{path} exists and is not empty (overwrite=True, --overwrite, replaces it)")


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``path``; rename it to ``path`` only when
    the block completes, so a crash never leaves a half-written checkpoint."""
    path = os.path.abspath(path)
    check_destination(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with disk_space(path):
            yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.isdir(path) and os.listdir(path):  # overwrite: move the old one aside first
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)  # onto nothing or an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_megatron_checkpoint(path: str) -> str:
    """The directory holding model_config.json: ``path`` itself, or the iteration a
    Megatron-style ``latest_checkpointed_iteration.txt`` names (``100`` or ``iter_0000100``)."""
    if not os.path.exists(path):
        raise ConversionError(f"megatron checkpoint not found: {path}")
    if not os.path.isdir(path):
        raise ConversionError(f"{path} is a file; --load expects a megatron checkpoint directory")
    if os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE)):
        return path
    for name in LATEST_FILES:
        candidate = latest_checkpoint(path, name)
        if candidate is None:
            continue
        if os.path.isfile(os.path.join(candidate, MODEL_CONFIG_FILE)):
            return candidate
        raise ConversionError(f"{os.path.join(path, name)} names '{os.path.basename(candidate)}', "
                              f"which holds no {MODEL_CONFIG_FILE}")
    raise ConversionError(
        f"{path}: not a megatron checkpoint (no {MODEL_CONFIG_FILE}, no latest_checkpointed_iteration.txt)"
    )
