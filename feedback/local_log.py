"""Durable append-only record files: the embedded bus's topics and the Kafka bus's spool.

A record is one line (encoded events are compact JSON, which never holds a raw newline); its position
is its byte offset. Appends are one `write()` on an O_APPEND descriptor under an exclusive `flock`, so
several processes (Serve gateway replicas) can append to one file without interleaving. A record is in
the page cache, and so survives a crash of its process, when `append` returns; `fsync` runs in a
background thread every few milliseconds (group commit) and on `sync()`, so publishing never waits for
the disk. A reader only takes complete lines, so a record being written is never half read.

Retention: `release_before` punches a hole over records every reader is done with. The disk space
goes back to the filesystem while positions (byte offsets) stay valid; a reader that starts inside
the hole skips it (it reads as NUL bytes, which no record starts with).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("flywheel.feedback.log")

READ_CHUNK = 1 << 20
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_HOLE_ALIGN = 1 << 16
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class LogBusy(Exception):
    """Another process has claimed this record file."""


class LogRecord(NamedTuple):
    position: int
    next_position: int
    value: bytes


class RecordLog:
    """One append-only file of newline-terminated records."""

    def __init__(self, path: Path, *, exclusive: bool = False) -> None:
        """Open (creating) `path`. `exclusive` claims it for this process until `close` (the spool): a
        second claimant gets LogBusy, and appends skip the per-write lock."""
        self.path = path
        self._exclusive = exclusive
        self._dirty = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if exclusive else 0))
        except BlockingIOError:
            os.close(self._fd)
            raise LogBusy(f"{path} is held by another process") from None
        self._terminate_torn_tail()
        if not exclusive:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextmanager
    def _append_lock(self) -> Iterator[None]:
        if self._exclusive:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _terminate_torn_tail(self) -> None:
        # A crash mid-write (power loss) can leave a partial last line; end it so that the next record
        # starts on its own line. The reader then sees one malformed record, not a merged one.
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            log.warning("event=torn_record path=%s position=%d", self.path, size)
            os.write(self._fd, b"\n")

    def append(self, record: bytes) -> None:
        if b"\n" in record:
            raise ValueError("a record must not contain a newline")
        data = record + b"\n"
        with self._append_lock():
            written = os.write(self._fd, data)
        if written != len(data):  # only on a full disk; the tail is repaired on the next open
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        self._dirty = True

    def sync(self) -> None:
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def disk_bytes(self) -> int:
        """Space the file really takes on disk (holes left by `release_before` take none)."""
        return os.fstat(self._fd).st_blocks * 512

    def release_before(self, position: int) -> bool:
        """Return the disk space of everything before `position` (rounded down to 64 KiB) to the
        filesystem; positions stay valid. False where the filesystem cannot punch holes."""
        end = position - position % _HOLE_ALIGN
        if end <= 0:
            return True
        if _libc.fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_long(0),
                           ctypes.c_long(end)) != 0:
            log.warning("event=log_retention_unsupported path=%s error=%s", self.path,
                        os.strerror(ctypes.get_errno()))
            return False
        return True

    def read(self, position: int, max_records: int) -> list[LogRecord]:
        """Up to `max_records` complete records starting at byte `position`."""
        records: list[LogRecord] = []
        chunk_size = READ_CHUNK
        while len(records) < max_records:
            chunk = os.pread(self._fd, chunk_size, position)
            end = chunk.rfind(b"\n")
            if end < 0:
                if len(chunk) < chunk_size:
                    break  # nothing, or a record still being written
                chunk_size *= 2  # one record longer than a chunk
                continue
            for line in chunk[:end].split(b"\n"):
                if not line.startswith(b"\0"):  # a released hole (and the record it cut) is skipped
                    records.append(LogRecord(position, position + len(line) + 1, line))
                position += len(line) + 1
                if len(records) == max_records:
                    break
        return records

    def truncate(self) -> None:
        with self._append_lock():
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1


def count_records(path: Path, position: int = 0) -> int:
    """Complete records in `path` from `position` on (for status reports; reads the file once)."""
    with path.open("rb") as f:
        f.seek(position)
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(READ_CHUNK), b""))


class PeriodicSync:
    """A daemon thread that fsyncs some record logs every `interval_s` (group commit)."""

    def __init__(self, logs: Iterable[RecordLog], interval_s: float = 0.02, name: str = "flywheel-fsync") -> None:
        self._logs = list(logs)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sync_all()

    def sync_all(self) -> None:
        for record_log in self._logs:
            try:
                record_log.sync()
            except OSError as exc:  # a closed or failing file: the writer reports its own errors
                log.warning("event=fsync_failed path=%s error=%r", record_log.path, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sync_all()
