"""Files that appear whole or not at all: write under a temporary name beside the
final one, fsync, then rename. Every stage's outputs (datasets, scores, blends,
reports, checkpoints' small files) go through these, so a kill never leaves a
half-written file under a final name.

A full disk (ENOSPC, or EDQUOT: the user's quota spent) is the user's to fix, not a bug:
the write sites turn it into one `DiskFullError` naming the file, the bytes it needed where
they are known and the bytes free there (`disk_space`), and remove what they had written
under temporary names, so that a rerun after space is freed starts clean.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from typing import Iterator, Optional

import numpy as np

from megatron_miniplm.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError, OSError):
    """A write that found its filesystem full or its quota spent: names the file, the bytes
    needed (where known) and the bytes free."""

    def __init__(self, path: str, needed: Optional[int] = None, cause: Optional[OSError] = None):
        self.path, self.needed = path, needed
        what = "no space left on the device" if cause is None or cause.errno != errno.EDQUOT else "disk quota exceeded"
        need = f"{needed:,} bytes needed, " if needed is not None else ""
        super().__init__(f"{path}: {what} ({need}{_free(path)}); free space and run again")
        self.errno = cause.errno if cause is not None else errno.ENOSPC

    def __reduce__(self):  # picklable (to another process) with its own arguments
        return DiskFullError, (self.path, self.needed, OSError(self.errno, os.strerror(self.errno)))


def _free(path: str) -> str:
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        return f"{shutil.disk_usage(directory).free:,} bytes free there"
    except OSError:
        return "free space unknown"


def space_ran_out(e: BaseException, path: str, needed: int) -> bool:
    """Whether a failed write of `needed` bytes under `path` is explained by a full disk: an
    ENOSPC or EDQUOT among its causes, or, for writers that lose the errno (torch's zip
    writer reports "unexpected pos", wrapped in a checkpoint exception), less space free
    there now than the write needed."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


@contextlib.contextmanager
def disk_space(path: str, needed: Optional[int] = None) -> Iterator[None]:
    """Writes to `path` inside: a full disk becomes a DiskFullError naming it."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise DiskFullError(path, needed, e) from e


def close_quietly(f) -> None:
    """Close a file being thrown away: its buffered bytes may fail to reach a full disk."""
    try:
        f.close()
    except OSError:
        pass


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def temp_name(path: str) -> str:
    """A name beside `path`, unique to this process and call."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish(tmp: str, path: str) -> None:
    """fsync `tmp`, then rename it to `path` (atomic on POSIX). A network filesystem may
    report a full disk only here."""
    with disk_space(path), open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = temp_name(path)
    data = text.encode("utf-8")
    try:
        with disk_space(path, len(data)), open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


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
        try:
            with disk_space(npy_path, np.dtype(dtype).itemsize * int(np.prod(shape))):
                self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
            self._reserve()
        except BaseException:
            self.abort()
            raise

    def _reserve(self) -> None:
        """Allocate the file's blocks now: a memory-mapped page that a full disk cannot hold
        kills the process with SIGBUS when it is first written, with no message."""
        size = os.path.getsize(self.tmp)
        if not size or not hasattr(os, "posix_fallocate"):
            return
        with disk_space(self.npy_path, size), open(self.tmp, "rb+") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno in NO_SPACE:
                    raise
                # A filesystem that cannot allocate ahead: pages are allocated as they are written.

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
        remove_quietly(self.tmp)
