"""One launch per work directory: ``WORK_DIR/launch.lock``.

The first node's launcher holds an exclusive ``flock`` on the file for as long as it runs, and
the tools it starts inherit the locked descriptor: on a local filesystem the lock is held until
the launcher and every process it started have exited, however they end (SIGKILL included: the
kernel releases it), so a dead launch never leaves a lock behind and nothing needs cleaning up. A second launch is
refused at once with the holder's host, pid and start time, which the holder writes into the
file. The launchers of the other nodes of the same launch do not take it: they only read the
first node's records.

What it relies on: ``flock`` reaching every node that mounts the work directory. Linux's NFS
client turns it into NFS byte-range locks (NFSv4, or NFSv3 with lockd), held by the launcher's
process alone (a killed launcher's tools no longer hold it there) and released by the server
when a crashed client's lease expires; Lustre needs the ``flock`` mount option
(``localflock`` locks per node only); GPFS supports it. Where the filesystem refuses locks
(ENOLCK, EOPNOTSUPP) the launch goes on unlocked and says so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable, Optional

from megatron_miniplm.errors import UserError

LOCK_FILE = "launch.lock"


class WorkDirInUse(UserError, RuntimeError):
    """Another launch holds the work directory."""


class LaunchLock:
    """``acquire()`` once per launch on its first node; ``fd`` is the descriptor the launched
    tools must inherit (``subprocess`` ``pass_fds``) so that the lock outlives a killed launcher
    for as long as its tools run."""

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, LOCK_FILE)
        self.fd: Optional[int] = None

    def acquire(self, *, warn: Callable[[str], None] = print) -> "LaunchLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkDirInUse(f"{os.path.dirname(self.path)}: in use by another launch ({holder}); wait for it "
                                   f"to end or stop it, or give this one another work_dir") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                warn(f"warning: {self.path}: the filesystem refuses locks ({os.strerror(e.errno)}): nothing stops "
                     f"a second launch on this work directory")
                return self
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "command": " ".join(sys.argv)}).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes once the launched tools have closed their copies too
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
