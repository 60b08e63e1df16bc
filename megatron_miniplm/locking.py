"""Exclusive locks on the files a process writes: ``flock`` on a lock file that names its holder.

A process takes the lock of what it writes (a pipeline's work directory, a tool's output) and
holds it until it exits, however it ends: the kernel releases an ``flock`` with the last
descriptor of the open file (SIGKILL included), so a dead holder never leaves a lock behind
and nothing needs cleaning up. A second process is refused at once with the holder's host,
pid, start time and command, which the holder writes into the lock file.

What it relies on: ``flock`` reaching every node that mounts the directory. Linux's NFS client
turns it into NFS byte-range locks (NFSv4, or NFSv3 with lockd), released by the server when a
crashed client's lease expires; Lustre needs the ``flock`` mount option (``localflock`` locks
per node only); GPFS supports it. Where the filesystem refuses locks (ENOLCK, EOPNOTSUPP) the
process goes on unlocked and says so.
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

LOCK_SUFFIX = ".lock"  # lock files hold no data: a stage's recorded outputs leave them out


class InUse(UserError, RuntimeError):
    """Another process holds the lock."""


def take(path: str, what: str, *, warn: Callable[[str], None] = print,
         refused: type = InUse, by: str = "another process", advice: str = "wait for it to end or stop it"
         ) -> Optional[int]:
    """Take the exclusive lock of ``path`` (created if need be) for ``what`` (as messages name it):
    the locked descriptor, which the caller keeps open for as long as it writes; None where the
    filesystem refuses locks. Raises ``refused`` naming the holder when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise refused(f"{what}: in use by {by} ({holder}); {advice}") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                warn(f"warning: {path}: the filesystem refuses locks ({os.strerror(e.errno)}): nothing stops "
                     f"a second process writing {what}")
                return None
            raise
        if _is_current(fd, path):
            break
        os.close(fd)  # a holder releasing removed this file after we opened it: take the new one
    _write_holder(fd)
    return fd


def _is_current(fd: int, path: str) -> bool:
    """The locked file is the one ``path`` names (``release_outputs`` removes lock files)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message of a refused second process. On a full disk the lock
    is held without it (the refusal then says the record is unreadable): the writes that
    follow report the full disk with their own files."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "command": " ".join(sys.argv)}).encode(), 0)
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise


def read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose record is unreadable"


_held: list[tuple[int, str]] = []  # the outputs' locks a tool holds until it ends


def hold_output(output: str, what: str, *, rank: int = 0) -> None:
    """A tool writing ``output`` (a directory, or a prefix of files) holds ``output.lock`` until it
    exits; a second tool writing the same output is refused at once (InUse). Only the job's
    rank 0 takes it: the other ranks of one job are the same writer, and a refused rank 0 ends
    the job before they pass their first collective."""
    if rank != 0:
        return
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    path = os.path.abspath(output).rstrip(os.sep) + LOCK_SUFFIX
    fd = take(path, what, warn=lambda m: print(m, file=sys.stderr),
              by="another tool", advice="wait for it to end or stop it, or write elsewhere")
    if fd is not None:
        _held.append((fd, path))


def release_outputs() -> None:
    """Remove the lock files of the outputs this process holds, then let go of them (the tool
    runner's last act, whatever the tool's end): nothing is left beside an output. Removed
    while still locked, so a process that opened the old file finds it is no longer the
    current one (``take``) instead of sharing the lock with the next holder. A killed tool
    leaves its lock file; the next one takes it over."""
    while _held:
        fd, path = _held.pop()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)
