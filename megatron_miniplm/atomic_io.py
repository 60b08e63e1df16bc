"""Files that appear whole or not at all: write under a temporary name beside the
final one, fsync, then rename. Every stage's outputs (datasets, scores, blends,
reports, checkpoints' small files) go through these, so a kill never leaves a
half-written file under a final name."""
from __future__ import annotations

import json
import os
import uuid


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
