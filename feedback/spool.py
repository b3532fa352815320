"""The Kafka bus's durable outbox: every event is spooled on disk first, then forwarded in order.

Each process owns one segment, `<dir>/<created>-<pid>.log`, claimed with an flock for its lifetime,
and records how far it has been delivered in `<name>.pos`. A segment whose owner is gone (crash,
restart) is adopted by the next bus that starts: adopted segments are drained first, oldest first,
then the bus's own, so events leave in the order they were published. A drained adopted segment is
deleted; the own segment is truncated once drained and large, and deleted on a clean close.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from feedback.local_log import LogBusy, LogRecord, RecordLog, count_records

log = logging.getLogger("flywheel.feedback.spool")

TRUNCATE_BYTES = 1 << 20


def _read_position(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):  # never written, or torn by a crash: resend (dupes are fine)
        return 0


@dataclass
class _Segment:
    log: RecordLog
    delivered: int  # byte position up to which records reached the broker
    pending: int  # records after `delivered`
    pos_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.pos_path = self.log.path.with_suffix(".pos")

    def save_position(self, position: int) -> None:
        self.delivered = position
        tmp = self.pos_path.with_suffix(".pos.tmp")
        tmp.write_text(str(position))
        os.replace(tmp, self.pos_path)

    def remove(self) -> None:
        self.log.close()
        for path in (self.log.path, self.pos_path):
            path.unlink(missing_ok=True)


class Spool:
    """A durable FIFO of encoded events. `append` from any thread; `peek`/`ack` from one forwarder."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._lock = threading.Lock()
        self._segments = [*self._adopt_orphans(), self._open(directory / f"{time.time_ns():020d}-{os.getpid()}.log")]
        self._own = self._segments[-1]

    def _open(self, path: Path) -> _Segment:
        record_log = RecordLog(path, exclusive=True)
        delivered = min(_read_position(path.with_suffix(".pos")), record_log.size())
        return _Segment(record_log, delivered, count_records(path, delivered))

    def _adopt_orphans(self) -> list[_Segment]:
        adopted = []
        for path in sorted(self.directory.glob("*.log")):
            try:
                segment = self._open(path)
            except LogBusy:
                continue  # a live bus in another process owns it
            log.info("event=spool_adopted path=%s pending=%d", path, segment.pending)
            adopted.append(segment)
        return adopted

    @property
    def own_log(self) -> RecordLog:
        """The only segment this process appends to (the one to fsync)."""
        return self._own.log

    def pending(self) -> int:
        return sum(segment.pending for segment in self._segments)

    def oldest_pending(self) -> bytes | None:
        """The oldest record not yet delivered (read-only: safe beside the forwarder), if any."""
        with self._lock:
            head = next((s for s in self._segments if s.pending), None)
            position = head.delivered if head else 0
        records = head.log.read(position, 1) if head else []
        return records[0].value if records else None

    def append(self, record: bytes) -> None:
        with self._lock:
            self._own.log.append(record)
            self._own.pending += 1

    def peek(self, max_records: int, max_bytes: int) -> list[LogRecord]:
        """The oldest undelivered records (one segment; at least one, else within `max_bytes`)."""
        with self._lock:
            while self._segments[0] is not self._own and not self._segments[0].pending:
                self._segments.pop(0).remove()  # an adopted segment, fully delivered
            head = self._segments[0]
        records = head.log.read(head.delivered, max_records)
        if not records and head is not self._own:
            head.pending = 0  # counted records that cannot be read back (a torn tail): nothing to send
        size = 0
        for n, record in enumerate(records):
            size += len(record.value)
            if size > max_bytes and n:
                return records[:n]
        return records

    def ack(self, records: list[LogRecord]) -> None:
        """Mark records from the last `peek` (a prefix of it, in order) delivered."""
        if not records:
            return
        with self._lock:
            head = self._segments[0]
            head.save_position(records[-1].next_position)
            head.pending -= len(records)
            if head is self._own and not head.pending and head.delivered >= TRUNCATE_BYTES:
                head.save_position(0)  # first: a crash before the truncate only resends delivered events
                head.log.truncate()

    def close(self) -> None:
        with self._lock:
            for segment in self._segments:
                if segment is self._own and not segment.pending:
                    segment.remove()
                else:
                    segment.log.close()


def spooled_pending(directory: Path) -> int:
    """Undelivered records in every segment under `directory` (for status; takes no locks)."""
    total = 0
    for path in directory.glob("*.log"):
        try:
            total += count_records(path, _read_position(path.with_suffix(".pos")))
        except FileNotFoundError:
            continue  # drained and removed while we looked
    return total
