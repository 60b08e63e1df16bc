"""One launch per work directory: ``WORK_DIR/launch.lock`` (``megatron_miniplm/locking.py``).

The first node's launcher holds the lock for as long as it runs, and the tools it starts
inherit the locked descriptor: the lock is held until the launcher and every process it
started have exited, however they end, so a killed launcher's tools still hold the directory
while they may write. On NFS the lock belongs to the launcher's process alone (a killed
launcher's tools no longer hold it there). The launchers of the other nodes of the same launch
do not take it: they only read the first node's records.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from megatron_miniplm.locking import InUse, take

LOCK_FILE = "launch.lock"


class WorkDirInUse(InUse):
    """Another launch holds the work directory."""


class LaunchLock:
    """``acquire()`` once per launch on its first node; ``fd`` is the descriptor the launched
    tools must inherit (``subprocess`` ``pass_fds``) so that the lock outlives a killed launcher
    for as long as its tools run."""

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, LOCK_FILE)
        self.fd: Optional[int] = None

    def acquire(self, *, warn: Callable[[str], None] = print) -> "LaunchLock":
        self.fd = take(self.path, os.path.dirname(self.path), warn=warn, refused=WorkDirInUse,
                       by="another launch", advice="wait for it to end or stop it, or give this one another work_dir")
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes once the launched tools have closed their copies too
            self.fd = None
