"""The framing of progress logs: records survive as written, a torn or altered record ends the
log and is truncated before the next append, a payload may say its own size."""

import os
import struct
import zlib

import pytest

from megatron_miniplm import progress_log

FIXED = progress_log.Format(b"FIX1", lambda count, _: 3 * count)  # three bytes a row


def _sized(count, first):
    """A length byte per row, then the rows' bytes: the size is known once the lengths are read."""
    return count if len(first) < count else count + sum(first[:count])


SIZED = progress_log.Format(b"SIZ1", _sized)


def write(path, fmt, *records):
    w = progress_log.Writer(open(path, "ab"), fmt, fsync=False)
    for key, count, payload in records:
        w.append(key, count, payload)
    w.close()


def keys(path, fmt):
    return [r.key for r in progress_log.records(path, fmt)]


def test_the_bytes_of_a_record_and_its_offsets(tmp_path):
    """The frame, built by hand: magic | key u64 | count u32 | payload | crc32 of all before."""
    path = str(tmp_path / "log")
    write(path, SIZED, (7, 2, b"\x01\x03abcd"), (2**40, 0, b""))
    first = b"SIZ1" + struct.pack("<QI", 7, 2) + b"\x01\x03abcd"
    second = b"SIZ1" + struct.pack("<QI", 2**40, 0)
    expected = first + struct.pack("<I", zlib.crc32(first)) + second + struct.pack("<I", zlib.crc32(second))
    assert open(path, "rb").read() == expected
    got = list(progress_log.records(path, SIZED))
    assert [(r.key, r.count, r.payload, r.start, r.end) for r in got] == [
        (7, 2, b"\x01\x03abcd", 0, len(first) + 4), (2**40, 0, b"", len(first) + 4, len(expected))]
    assert [r.payload for r in progress_log.records(path, SIZED, got[1].start)] == [b""]
    assert progress_log.valid_length(path, SIZED) == len(expected)


@pytest.mark.parametrize("fmt,records", [
    (FIXED, [(0, 2, b"abcdef"), (1, 1, b"xyz")]),
    (SIZED, [(0, 2, b"\x02\x01abc"), (1, 3, b"\x00\x04\x01wxyzq")]),
])
def test_a_torn_tail_is_ignored_then_truncated_before_appending(tmp_path, fmt, records):
    """A kill at any byte of the last record: the log ends after the one before it, and the
    next writer cuts the torn bytes off before its own record."""
    path = str(tmp_path / "log")
    write(path, fmt, records[0])
    whole = os.path.getsize(path)
    write(path, fmt, records[1])
    size = os.path.getsize(path)
    for cut in range(1, size - whole):
        with open(path, "r+b") as f:
            f.truncate(size - cut)
        assert keys(path, fmt) == [0], cut
        assert progress_log.valid_length(path, fmt) == whole
        write(path, fmt, records[1])
        assert os.path.getsize(path) == size and keys(path, fmt) == [0, 1], cut


@pytest.mark.parametrize("where", ["magic", "key", "count", "payload", "crc"])
def test_an_altered_record_ends_the_log(tmp_path, where):
    path = str(tmp_path / "log")
    write(path, FIXED, (0, 1, b"abc"), (1, 1, b"def"), (2, 1, b"ghi"))
    offset = {"magic": 0, "key": 4, "count": 12, "payload": 16, "crc": 19}[where] + 23  # in the second record
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert keys(path, FIXED) == [0]
    write(path, FIXED, (3, 1, b"jkl"))  # the altered record and all after it are cut off
    assert keys(path, FIXED) == [0, 3] and os.path.getsize(path) == 46


def test_a_log_of_another_format_is_empty_to_a_reader(tmp_path):
    path = str(tmp_path / "log")
    write(path, FIXED, (0, 1, b"abc"))
    assert keys(path, SIZED) == [] and progress_log.valid_length(path, SIZED) == 0
    assert progress_log.valid_length(str(tmp_path / "none"), FIXED) == 0


def test_fsync_at_most_every_interval_and_at_close(tmp_path, monkeypatch):
    synced, now = [], [0.0]
    monkeypatch.setattr(progress_log.os, "fsync", lambda fd: synced.append(now[0]))
    w = progress_log.Writer(open(tmp_path / "log", "ab"), FIXED, sync_interval_s=5.0, clock=lambda: now[0])
    for t in (1.0, 4.0, 6.0, 7.0, 12.0):
        now[0] = t
        w.append(0, 1, b"abc")
    w.close()
    assert synced == [6.0, 12.0, 12.0]
    every = progress_log.Writer(open(tmp_path / "log", "ab"), FIXED, clock=lambda: now[0])  # interval 0: each record
    every.append(1, 1, b"def")
    every.append(2, 1, b"ghi")
    assert len(synced) == 5
    every.close()
