"""Where a pipeline run stands: ``WORK_DIR/status.json``, kept by the first node's launcher, and
``tools/pipeline.py --status``, which reads it from any node, while the run goes on or after
it has crashed.

The launcher rewrites the file (atomically) when a stage starts and when it ends: each
stage's state, since when, for how long, and why it failed. How far a running stage is comes
from what its tool already writes as it goes (a training stage's metrics file), read when the
status is asked for (``Stage.progress``). Whether the launch is still alive comes from the
work directory's lock (``pipeline/lock.py``): a stage left "running" by a launch that no
longer holds the lock was stopped (killed, crashed, preempted), and rerunning the same
command resumes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

from megatron_miniplm.atomic_io import write_json_atomic
from megatron_miniplm.pipeline.lock import LOCK_FILE

STATUS_FILE = "status.json"


class StatusFile:
    """The launcher's side: one entry per stage, in the plan's order."""

    def __init__(self, work_dir: str, stages: list[str]):
        self.path = os.path.join(work_dir, STATUS_FILE)
        self.data = {"launch": {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()},
                     "stages": {name: {"state": "pending"} for name in stages}}

    def set(self, stage: str, state: str, **fields) -> None:
        entry = self.data["stages"][stage]
        if state == "running":
            entry.clear()
            fields.setdefault("started", _now())
            fields["since"] = time.time()
        elif "since" in entry:
            fields["seconds"] = round(time.time() - entry["since"], 1)
        entry.update(state=state, **fields)
        self.data["updated"] = _now()
        write_json_atomic(self.path, self.data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read(work_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(work_dir, STATUS_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def launch_alive(work_dir: str) -> bool:
    """Whether a launch holds the work directory now (its lock is taken)."""
    try:
        fd = os.open(os.path.join(work_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False  # nobody holds it (the shared lock goes with the descriptor)
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def report(graph, dirs_of) -> str:
    """One line per stage of ``graph``: its state, and for a running stage how far it is.
    ``dirs_of(stage)``: the output directories of the stages it reads."""
    work_dir = os.path.abspath(graph.cfg.work_dir)
    status, alive = read(work_dir), launch_alive(work_dir)
    if status is None:
        return f"{work_dir}: no run has started here"
    launch = status["launch"]
    head = (f"launch on {launch['host']} (pid {launch['pid']}) since {launch['started']}: "
            f"{'running' if alive else 'not running'}; status of {status.get('updated', '?')}")
    lines = [head]
    for stage in graph.stages:
        entry = status["stages"].get(stage.name, {"state": "not in this launch's plan"})
        lines.append(f"  {stage.name:<28} {_describe(stage, entry, alive, graph, dirs_of)}")
    return "\n".join(lines)


def _describe(stage, entry: dict, alive: bool, graph, dirs_of) -> str:
    state = entry["state"]
    if state == "running" and not alive:
        return f"stopped (started {entry.get('started')}; the launch is gone): rerun the command to resume"
    if state == "running":
        progress = stage.progress(graph.out_dir(stage), dirs_of(stage)) if stage.progress else None
        return f"running since {entry.get('started')}" + (f": {progress}" if progress else "")
    if state in ("done", "failed", "stopped") and "seconds" in entry:
        return f"{state} in {entry['seconds']:.0f} s" + (f": {entry['error']}" if entry.get("error") else "")
    return state
