"""Files that appear whole or not at all: write under a temporary name beside the
final one, fsync, then rename. Every stage's outputs (datasets, scores, blends,
reports, checkpoints' small files) go through these, so a kill never leaves a
half-written file under a final name."""
from __future__ import annotations

import json
import os
import uuid

import numpy as np


def temp_name(path: str) -> str:
    """A name beside `path`, unique to this process and call."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish(tmp: str, path: str) -> None:
    """fsync `tmp`, then rename it to `path` (atomic on POSIX)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = temp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    publish(tmp, path)


def write_json_atomic(path: str, obj, **dump_kwargs) -> None:
    """`obj` as indented JSON (plus a final newline); dump_kwargs go to json.dump."""
    write_text_atomic(path, json.dumps(obj, **{"indent": 2, "ensure_ascii": False, **dump_kwargs}) + "\n")


class NpyWithMeta:
    """An .npy array filled in place through a memory-mapped temporary file (it never
    needs to fit in RAM), then published with its JSON meta: the old meta is removed
    first and the new one written last, so no moment has an old meta over a new array."""

    def __init__(self, npy_path: str, meta_path: str, dtype, shape: tuple):
        self.npy_path, self.meta_path = npy_path, meta_path
        self.tmp = temp_name(npy_path)
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)

    def close(self) -> str:
        """Flushes and unmaps the array; returns the temporary file, complete."""
        self.array.flush()
        del self.array
        return self.tmp

    def commit(self, meta: dict, **dump_kwargs) -> None:
        if hasattr(self, "array"):
            self.close()
        if os.path.exists(self.meta_path):
            os.remove(self.meta_path)
        publish(self.tmp, self.npy_path)
        write_json_atomic(self.meta_path, meta, **dump_kwargs)

    def abort(self) -> None:
        if hasattr(self, "array"):
            del self.array
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
