"""The trainer's metrics file (``--metrics-file``): JSON lines, appended by rank 0.

One line per training iteration (``loss``, ``grad_norm``, ``lr``, consumed tokens and
FLOPs, ...), one per validation (``valid_loss``) and one per logging interval with the
throughput of the iterations since the last (``tokens_per_s``, ``mfu``, ...), each with
its ``iteration``. A run
resumed from a checkpoint re-runs the iterations after it and appends them again, so the
last line of an iteration wins; a run killed while writing may leave its last line cut,
which is ignored. Any other line that is not JSON is an error naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Metrics:
    train: dict[int, dict]  # iteration -> its last training line
    valid: dict[int, dict]  # iteration -> its last validation line
    throughput: dict[int, dict]  # iteration closing a logging window -> its last throughput line


def kind(record: dict) -> str:
    """Which of ``Metrics``' kinds a line is: "valid", "throughput" or "train" (its own keys say)."""
    return "valid" if "valid_loss" in record else "throughput" if "tokens_per_s" in record else "train"


def append(path: str, records) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(m) + "\n" for m in records)


def read(path: str) -> Metrics:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = Metrics({}, {}, {})
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a last line cut by a kill
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        getattr(out, kind(m))[m["iteration"]] = m
    return out
