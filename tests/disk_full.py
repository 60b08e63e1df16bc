"""A disk that fills up, for tests: writes through `open` in the named modules, and
os.posix_fallocate, fail with ENOSPC once a byte budget is spent. A write that does not fit
writes the bytes that do first, as a real full disk does (a torn tail)."""
from __future__ import annotations

import builtins
import errno
import os


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk:
    """`budget` bytes (None: unlimited) for the writes of `modules`; `writes` counts every
    write call, in order, so that a test can make each one in turn the one that fails."""

    def __init__(self, monkeypatch, modules, budget: int | None = None):
        self.budget = budget
        self.writes: list[tuple[str, int]] = []  # (file, bytes asked for) of each write call
        real_open, real_fallocate = builtins.open, os.posix_fallocate

        def metered_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _Metered(f, self, str(file)) if any(c in mode for c in "wax+") else f

        def fallocate(fd, offset, length):
            if self.take(length, os.readlink(f"/proc/self/fd/{fd}")) < length:
                raise no_space()
            real_fallocate(fd, offset, length)

        for module in modules:
            monkeypatch.setattr(module, "open", metered_open, raising=False)
        monkeypatch.setattr(os, "posix_fallocate", fallocate)

    def take(self, n: int, path: str) -> int:
        """Bytes of an n-byte write to `path` that fit."""
        self.writes.append((path, n))
        if self.budget is None:
            return n
        fit = min(n, self.budget)
        self.budget -= fit
        return fit

    def sites(self) -> list[int]:
        """The write calls worth failing: the first and the last into each file."""
        first, last = {}, {}
        for k, (path, _) in enumerate(self.writes):
            first.setdefault(path, k)
            last[path] = k
        return sorted(set(first.values()) | set(last.values()))

    def fail_at(self, k: int, counted: list) -> None:
        """From now on: let write calls 0..k-1 of a counted run (its `writes`) through and fail
        call k halfway."""
        self.budget = sum(n for _, n in counted[:k]) + counted[k][1] // 2
        self.writes = []


class _Metered:
    def __init__(self, f, disk: FullDisk, path: str):
        self._f, self._disk, self._path = f, disk, path

    def write(self, data):
        if isinstance(data, str):
            n = len(data.encode("utf-8"))
            if self._disk.take(n, self._path) < n:
                raise no_space()
            return self._f.write(data)
        view = memoryview(data).cast("B")
        fit = self._disk.take(view.nbytes, self._path)
        if fit < view.nbytes:
            self._f.write(view[:fit])
            raise no_space()
        return self._f.write(view)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)
