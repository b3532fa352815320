"""The curator: joins each feedback event to its prediction, masks PII, and appends curated rows.

One batch is: poll records from the source (Kafka consumer group, or the local log) -> in one SQLite
transaction, park predictions and unmatched feedback, join whichever side arrives second, drop
feedback whose `event_id` was seen before -> write the rows as Parquet parts (atomic) -> record the
parts and the next positions in the same transaction -> commit -> rewrite the manifest -> commit the
Kafka offsets. The state database is the authority on positions (the consumer seeks to them when it
gets a partition), so a crash anywhere in that sequence replays the batch exactly: a part written
before a crashed commit is deleted on restart, and redelivered events are dropped by `event_id`.

State lives in `<feedback_dir>/curator/state.db`: predictions waiting for feedback (kept
`feedback.prediction_retention_s`), feedback waiting for its prediction (until it arrives, at most
`unmatched_retention_s` and `max_unmatched`, oldest dropped first and counted), curated event ids,
parts, positions, records that are not events, and counters. Everything in it is already masked.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from pydantic import BaseModel, ValidationError

from feedback.bus import kafka_client_config
from feedback.dataset import Manifest, PartFile, curated_dataset, task_counts
from feedback.local_log import RecordLog, count_records
from feedback.pii import mask_event, mask_pii
from feedback.schemas import CuratedExample, FeedbackEvent, PredictionEvent, decode_event, encode_event
from feedback.spool import spooled_pending
from feedback.supervisor import CuratorHealth, read_curators, read_health, report_lag
from flywheel.config import Settings

log = logging.getLogger("flywheel.feedback.curator")


class SourceRecord(NamedTuple):
    partition: str  # `topic/partition`
    offset: int  # Kafka offset, or byte position in the local log
    next_offset: int
    value: bytes


class Source(Protocol):
    """Where the curator reads events from. Positions are `topic/partition` -> next offset."""

    def poll(self, max_records: int, timeout_s: float) -> list[SourceRecord]: ...

    def rewind(self, positions: Mapping[str, int]) -> None:
        """Continue from `positions` (after a failed batch): what was polled since is read again."""
        ...

    def commit(self, positions: Mapping[str, int]) -> None:
        """Tell the broker how far the curator got (its own state already holds the truth)."""
        ...

    def caught_up(self) -> bool: ...

    def lag(self) -> int:
        """Records written but not yet polled (as far as the source knows without asking far)."""
        ...

    def close(self) -> None: ...


PROGRESS_EVERY_S = 5.0  # how often the curator reports its lag
RELEASE_STEP_BYTES = 1 << 20  # give space back a megabyte at a time, not on every batch


class LocalLogSource:
    """The embedded local log: one file per topic (partition 0), positions are byte offsets."""

    def __init__(self, settings: Settings, positions: Mapping[str, int]) -> None:
        directory = settings.feedback_dir / "log"
        topics = (settings.feedback.predictions_topic, settings.feedback.feedback_topic)
        self._logs = {f"{topic}/0": RecordLog(directory / f"{topic}.log") for topic in topics}
        self._positions = {partition: 0 for partition in self._logs}
        self._retention_bytes = settings.feedback.log_retention_bytes
        self._released = dict.fromkeys(self._logs, 0)
        self.rewind(positions)

    def poll(self, max_records: int, timeout_s: float) -> list[SourceRecord]:
        deadline = time.monotonic() + timeout_s
        share = max(1, max_records // len(self._logs))  # both topics get a turn, neither starves
        while True:
            records = []
            for partition, record_log in self._logs.items():
                for record in record_log.read(self._positions[partition], share):
                    records.append(SourceRecord(partition, record.position, record.next_position, record.value))
                    self._positions[partition] = record.next_position
            if records or time.monotonic() >= deadline:
                return records
            time.sleep(0.05)

    def rewind(self, positions: Mapping[str, int]) -> None:
        self._positions.update({p: positions[p] for p in self._logs if p in positions})

    def commit(self, positions: Mapping[str, int]) -> None:
        """Positions live in the curator's state; here the log gives back the space of what is curated,
        keeping the newest `log_retention_bytes` of it."""
        for partition, record_log in self._logs.items():
            release = positions.get(partition, 0) - self._retention_bytes
            if release - self._released[partition] >= RELEASE_STEP_BYTES and record_log.release_before(release):
                self._released[partition] = release

    def caught_up(self) -> bool:
        return all(not record_log.read(self._positions[p], 1) for p, record_log in self._logs.items())

    def lag(self) -> int:
        return sum(count_records(log.path, self._positions[p]) for p, log in self._logs.items())

    def close(self) -> None:
        for record_log in self._logs.values():
            record_log.close()


def _partition_key(tp: TopicPartition) -> str:
    return f"{tp.topic}/{tp.partition}"


class _SeekToState(ConsumerRebalanceListener):
    """On assignment, start each partition where the curator's state says, not at the group offset.

    kafka-python calls this from its network thread, so it reads the source's in-memory copy of the
    committed positions, never the SQLite state.
    """

    def __init__(self, consumer: KafkaConsumer, positions: dict[str, int]) -> None:
        self._consumer = consumer
        self._positions = positions

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        positions = dict(self._positions)
        for tp in assigned:
            if _partition_key(tp) in positions:
                self._consumer.seek(tp, positions[_partition_key(tp)])
        log.info("event=partitions_assigned partitions=%s", ",".join(sorted(map(_partition_key, assigned))))


class KafkaSource:
    """A member of the consumer group `feedback.consumer_group`; offsets are committed manually."""

    def __init__(self, settings: Settings, positions: Mapping[str, int], session_timeout_ms: int = 10_000) -> None:
        fs = settings.feedback
        self._positions = dict(positions)
        self._consumer = KafkaConsumer(
            **kafka_client_config(fs),
            group_id=fs.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=session_timeout_ms // 4,
            fetch_max_wait_ms=200,
        )
        self._consumer.subscribe([fs.predictions_topic, fs.feedback_topic],
                                 listener=_SeekToState(self._consumer, self._positions))

    def poll(self, max_records: int, timeout_s: float) -> list[SourceRecord]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [SourceRecord(_partition_key(tp), r.offset, r.offset + 1, r.value)
                for tp, records in batches.items() for r in records]

    def rewind(self, positions: Mapping[str, int]) -> None:
        self._positions.update(positions)
        for tp in self._consumer.assignment():
            if _partition_key(tp) in positions:
                self._consumer.seek(tp, positions[_partition_key(tp)])
            else:
                self._consumer.seek_to_beginning(tp)

    def commit(self, positions: Mapping[str, int]) -> None:
        self._positions.update(positions)
        offsets = {tp: OffsetAndMetadata(positions[_partition_key(tp)], "", -1)
                   for tp in self._consumer.assignment() if _partition_key(tp) in positions}
        try:
            self._consumer.commit(offsets)
        except KafkaError as exc:  # e.g. a rebalance: the state DB keeps the positions regardless
            log.warning("event=commit_failed error=%r", exc)

    def caught_up(self) -> bool:
        assignment = self._consumer.assignment()
        if not assignment:
            return False
        for tp in assignment:
            highwater = self._consumer.highwater(tp)  # known once a fetch for it came back
            try:
                position = self._consumer.position(tp, timeout_ms=1000)
            except KafkaError:  # revoked by a rebalance meanwhile
                return False
            if highwater is None or position is None or position < highwater:
                return False
        return True

    def lag(self) -> int:
        behind = 0
        for tp in self._consumer.assignment():
            highwater, position = self._consumer.highwater(tp), self._positions.get(_partition_key(tp))
            if highwater is not None and position is not None:
                behind += max(0, highwater - position)
        return behind

    def close(self) -> None:
        self._consumer.close(autocommit=False)


# -- state --------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY, event TEXT NOT NULL, source TEXT NOT NULL, offset INTEGER NOT NULL,
    ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions(ts);
CREATE TABLE IF NOT EXISTS unmatched (
    event_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, event TEXT NOT NULL, source TEXT NOT NULL,
    offset INTEGER NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS unmatched_request ON unmatched(request_id);
CREATE INDEX IF NOT EXISTS unmatched_ts ON unmatched(ts);
CREATE TABLE IF NOT EXISTS curated (event_id TEXT PRIMARY KEY, batch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS parts (path TEXT PRIMARY KEY, batch INTEGER NOT NULL, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS positions (partition TEXT PRIMARY KEY, next_offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    source TEXT NOT NULL, offset INTEGER NOT NULL, error TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (source, offset));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

COUNTERS = ("batches", "predictions", "received", "curated", "duplicates", "rejected", "unmatched_dropped",
            "refused")


E = TypeVar("E", PredictionEvent, FeedbackEvent)


class Located(NamedTuple, Generic[E]):
    """An event and where it was read from."""

    event: E
    source: str
    offset: int


class CuratorState:
    """The curator's durable memory (SQLite, WAL, synchronous=FULL); see the module docstring."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _scalar(self, sql: str, *args: object) -> Any:
        row = self._db.execute(sql, args).fetchone()
        return row[0] if row else None

    def bump(self, name: str, n: int = 1) -> int:
        self._db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                         (name, n, n))
        return int(self._scalar("SELECT value FROM counters WHERE name = ?", name))

    def counters(self) -> dict[str, int]:
        values = dict.fromkeys(COUNTERS, 0)
        values.update(self._db.execute("SELECT name, value FROM counters"))
        return values

    def positions(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT partition, next_offset FROM positions"))

    def set_positions(self, positions: Mapping[str, int]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO positions VALUES (?, ?)", positions.items())

    def known_feedback(self, event_id: str) -> bool:
        return bool(self._scalar("SELECT 1 FROM curated WHERE event_id = ? UNION ALL "
                                 "SELECT 1 FROM unmatched WHERE event_id = ?", event_id, event_id))

    def prediction(self, request_id: str) -> Located[PredictionEvent] | None:
        row = self._db.execute("SELECT event, source, offset FROM predictions WHERE request_id = ?",
                               (request_id,)).fetchone()
        return Located(PredictionEvent.model_validate_json(row[0]), row[1], row[2]) if row else None

    def add_prediction(self, found: Located[PredictionEvent]) -> bool:
        """Keep a (masked) prediction for joining; False if it was already there (a redelivery)."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO predictions VALUES (?, ?, ?, ?, ?)",
            (found.event.request_id, encode_event(found.event).decode(), found.source, found.offset,
             found.event.timestamp.timestamp()))
        return cursor.rowcount == 1

    def park_feedback(self, found: Located[FeedbackEvent]) -> None:
        event = found.event
        self._db.execute("INSERT INTO unmatched VALUES (?, ?, ?, ?, ?, ?)",
                         (event.event_id, event.request_id, encode_event(event).decode(), found.source,
                          found.offset, event.timestamp.timestamp()))

    def take_unmatched(self, request_id: str) -> list[Located[FeedbackEvent]]:
        rows = self._db.execute("SELECT event, source, offset FROM unmatched WHERE request_id = ? ORDER BY ts",
                                (request_id,)).fetchall()
        self._db.execute("DELETE FROM unmatched WHERE request_id = ?", (request_id,))
        return [Located(FeedbackEvent.model_validate_json(event), source, offset) for event, source, offset in rows]

    def mark_curated(self, event_id: str, batch: int) -> None:
        self._db.execute("INSERT INTO curated VALUES (?, ?)", (event_id, batch))

    def add_part(self, part: PartFile) -> None:
        self._db.execute("INSERT OR REPLACE INTO parts VALUES (?, ?, ?)",
                         (part.path, part.batch, part.model_dump_json()))

    def parts(self) -> list[PartFile]:
        return [PartFile.model_validate_json(entry) for (entry,) in
                self._db.execute("SELECT entry FROM parts ORDER BY batch, path")]

    def reject(self, record: SourceRecord, error: str) -> None:
        """Keep a record that is not a valid event (masked), so it is reported rather than lost."""
        value = mask_pii(record.value.decode("utf-8", errors="replace"))
        self._db.execute("INSERT OR IGNORE INTO rejected VALUES (?, ?, ?, ?)",
                         (record.partition, record.offset, error, value))

    def unmatched_summary(self) -> tuple[int, float | None]:
        count, oldest = self._db.execute("SELECT count(*), min(ts) FROM unmatched").fetchone()
        return int(count), oldest

    def prune_predictions(self, before_ts: float) -> int:
        return self._db.execute("DELETE FROM predictions WHERE ts < ?", (before_ts,)).rowcount

    def prune_unmatched(self, before_ts: float, keep: int) -> int:
        """Drop feedback that waited since before `before_ts`, then the oldest beyond `keep`; how many went.

        Feedback for a request id that never had a prediction (a client can send any well-formed id)
        would otherwise wait forever.
        """
        dropped = self._db.execute("DELETE FROM unmatched WHERE ts < ?", (before_ts,)).rowcount
        return dropped + self._db.execute(
            "DELETE FROM unmatched WHERE event_id IN (SELECT event_id FROM unmatched ORDER BY ts DESC LIMIT -1 "
            "OFFSET ?)", (keep,)).rowcount

    def close(self) -> None:
        self._db.close()


# -- masking and joining ------------------------------------------------------------------------

def decoded(record: SourceRecord) -> PredictionEvent | FeedbackEvent | str:
    """The event a record holds, or (logged) why it holds none: garbage, or a newer schema_version."""
    try:
        return decode_event(record.value)
    except ValidationError as exc:
        error = "; ".join(f"{'.'.join(map(str, e['loc'])) or '-'}: {e['msg']}" for e in exc.errors())
        log.error("event=record_rejected partition=%s offset=%d error=%r", record.partition, record.offset, error)
        return error


def join(
    feedback: Located[FeedbackEvent], prediction: Located[PredictionEvent], default_task: str
) -> CuratedExample:
    fb, pred = feedback.event, prediction.event
    if pred.prompt is not None:
        prompt_kind: Literal["text", "messages"] = "text"
        prompt = pred.prompt
    else:
        prompt_kind = "messages"
        prompt = json.dumps([m.model_dump() for m in pred.messages or []], ensure_ascii=False)
    return CuratedExample(
        event_id=fb.event_id, request_id=fb.request_id, task=pred.task or default_task,
        feedback_ts=fb.timestamp, prediction_ts=pred.timestamp,
        adapter_version=pred.adapter_version, prompt_kind=prompt_kind, prompt=prompt, answer=pred.answer,
        reasoning=pred.reasoning, rating=fb.rating, thumb=fb.thumb, correction=fb.correction, comment=fb.comment,
        user_id=fb.user_id, tenant_id=fb.tenant_id, rater=fb.rater, authenticated=fb.authenticated,
        asker=pred.asker, feedback_source=feedback.source,
        feedback_offset=feedback.offset, prediction_source=prediction.source, prediction_offset=prediction.offset,
    )


def may_rate(settings: Settings, feedback: Located[FeedbackEvent], prediction: Located[PredictionEvent]) -> bool:
    """Only the asker rates an answer (`feedback.rater: asker`): the gateway refuses a stranger it can tell
    apart (403); this catches the rest (a request another replica answered, or one from before a restart)."""
    asker, rater = prediction.event.asker, feedback.event.rater
    if settings.feedback.rater == "any" or asker is None or rater == asker:
        return True
    log.warning("event=feedback_refused event_id=%s request_id=%s why=not_the_asker", feedback.event.event_id,
                feedback.event.request_id)
    return False


# -- the curator --------------------------------------------------------------------------------

class BatchResult(BaseModel):
    """What one batch (or a drain of several) did."""

    records: int = 0
    predictions: int = 0
    feedback: int = 0
    curated: int = 0
    duplicates: int = 0
    unmatched: int = 0  # feedback parked in this batch to wait for its prediction
    rejected: int = 0
    refused: int = 0  # feedback from someone other than the answer's asker
    files: list[str] = []
    offsets: dict[str, tuple[int, int]] = {}

    def merge(self, other: BatchResult) -> BatchResult:
        counts = {name: getattr(self, name) + getattr(other, name) for name in
                  ("records", "predictions", "feedback", "curated", "duplicates", "unmatched", "rejected", "refused")}
        offsets = dict(self.offsets)
        for partition, (first, end) in other.offsets.items():
            offsets[partition] = (min(first, offsets.get(partition, (first, end))[0]), end)
        return BatchResult(**counts, files=self.files + other.files, offsets=offsets)


class Curator:
    """Drive it with `run(stop_event)` (a service), `drain()` (catch up and return) or `run_once()`."""

    def __init__(
        self,
        settings: Settings,
        source: Source | None = None,
        *,
        session_timeout_ms: int = 10_000,
    ) -> None:
        self.settings = settings
        self._batch_size = settings.feedback.curator_batch_size
        self._flush_s = settings.feedback.curator_flush_s
        self._last_prune = float("-inf")
        self._read_up_to_ts = time.time()  # the newest event read: with records behind it, the lag's age
        self._lag_known = False
        self.state = CuratorState(state_path(settings))
        self.dataset = curated_dataset(settings)
        self._recover()
        if source is not None:
            self.source = source
        elif settings.feedback.kafka_bootstrap:
            self.source = KafkaSource(settings, self.state.positions(), session_timeout_ms)
        else:
            self.source = LocalLogSource(settings, self.state.positions())
        log.info("event=curator_started source=%s positions=%s", type(self.source).__name__,
                 _format_positions(self.state.positions()))

    def _recover(self) -> None:
        """Drop parts of a batch that crashed before its commit; make the manifest match the state."""
        removed = self.dataset.remove_unlisted(part.path for part in self.state.parts())
        if removed:
            log.warning("event=uncommitted_parts_removed files=%s", ",".join(removed))
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.dataset.write_manifest(Manifest(updated_at=datetime.now(UTC), positions=self.state.positions(),
                                             files=self.state.parts()))

    def run(self, stop: threading.Event) -> None:
        """Curate until `stop` is set. A failed batch is rolled back and read again after a pause."""
        backoff = 0.5
        reported = float("-inf")
        while not stop.is_set():
            try:
                result = self.run_once(timeout_s=0.5)
                backoff = 0.5
                if time.monotonic() - reported > PROGRESS_EVERY_S or (result.records and not self._lag_known):
                    self._report_progress()
                    reported = time.monotonic()
            except Exception:  # broker, disk or a bug: nothing was committed, so replay the batch later
                log.exception("event=batch_failed retry_in_s=%.1f", backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                self.source.rewind(self.state.positions())

    def _report_progress(self) -> None:
        """How far behind the curator is, for /healthz, /metrics and `flywheel feedback status`."""
        behind = self.source.lag()
        report_lag(self.settings, behind, max(0.0, time.time() - self._read_up_to_ts) if behind else 0.0)
        self._lag_known = True

    def drain(self, timeout_s: float = 120.0) -> BatchResult:
        """Curate until the source has nothing more; TimeoutError if that takes longer than `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        total = BatchResult()
        while True:
            result = self.run_once(timeout_s=0.5)
            total = total.merge(result)
            if not result.records and self.source.caught_up():
                return total
            if time.monotonic() > deadline:
                raise TimeoutError(f"curator did not catch up within {timeout_s:.0f}s ({total.curated} curated)")

    def run_once(self, timeout_s: float | None = None) -> BatchResult:
        """Poll one batch (up to `curator_batch_size` records, or what came within `curator_flush_s` of the
        first one) and curate it."""
        records = self.source.poll(self._batch_size, self._flush_s if timeout_s is None else timeout_s)
        if records:
            deadline = time.monotonic() + self._flush_s
            while len(records) < self._batch_size and (left := deadline - time.monotonic()) > 0:
                records += self.source.poll(self._batch_size - len(records), left)
        return self.curate(records) if records else BatchResult()

    def curate(self, records: list[SourceRecord]) -> BatchResult:
        """One batch, all or nothing: see the module docstring for the order of writes."""
        result = BatchResult(records=len(records))
        positions = self.state.positions()
        rows: list[CuratedExample] = []
        with self.state.transaction():
            batch = self.state.bump("batches")
            for record in records:
                if record.offset < positions.get(record.partition, 0):
                    continue  # already curated (a rewind or a rebalance can hand it over twice)
                rows += self._apply(record, batch, result)
                positions[record.partition] = record.next_offset
                first = result.offsets.get(record.partition, (record.offset, 0))[0]
                result.offsets[record.partition] = (first, record.next_offset)
            result.files = self._write_parts(rows, batch, result.offsets, positions)
            result.curated = len(rows)
            self.state.set_positions(positions)
            for name in ("predictions", "curated", "duplicates", "rejected", "refused"):
                self.state.bump(name, getattr(result, name))
            self.state.bump("received", result.feedback - result.duplicates)
            self._prune(parked=result.unmatched > 0)
        self._write_manifest()
        self.source.commit(positions)
        log.info("event=curated rows=%d records=%d duplicates=%d unmatched=%d rejected=%d files=%s offsets=%s",
                 result.curated, result.records, result.duplicates, result.unmatched, result.rejected,
                 ",".join(result.files) or "-", _format_ranges(result.offsets))
        return result

    def _apply(self, record: SourceRecord, batch: int, result: BatchResult) -> list[CuratedExample]:
        event = decoded(record)
        if isinstance(event, str):
            self.state.reject(record, event)
            result.rejected += 1
            return []
        self._read_up_to_ts = max(self._read_up_to_ts, event.timestamp.timestamp())
        if isinstance(event, PredictionEvent):
            result.predictions += 1
            prediction = Located(mask_event(event), record.partition, record.offset)
            if not self.state.add_prediction(prediction):
                return []
            waiting = [f for f in self.state.take_unmatched(event.request_id) if self._may_rate(f, prediction, result)]
            for feedback in waiting:
                self.state.mark_curated(feedback.event.event_id, batch)
            return [join(feedback, prediction, self.settings.default_task) for feedback in waiting]
        result.feedback += 1
        if self.state.known_feedback(event.event_id):
            result.duplicates += 1
            return []
        feedback = Located(mask_event(event), record.partition, record.offset)
        prediction = self.state.prediction(event.request_id)
        if prediction is None:
            self.state.park_feedback(feedback)
            result.unmatched += 1
            return []
        if not self._may_rate(feedback, prediction, result):
            return []
        self.state.mark_curated(event.event_id, batch)
        return [join(feedback, prediction, self.settings.default_task)]

    def _may_rate(self, feedback: Located[FeedbackEvent], prediction: Located[PredictionEvent],
                  result: BatchResult) -> bool:
        if may_rate(self.settings, feedback, prediction):
            return True
        result.refused += 1
        return False

    def _write_parts(self, rows: list[CuratedExample], batch: int, offsets: dict[str, tuple[int, int]],
                     positions: dict[str, int]) -> list[str]:
        by_day: dict[str, list[CuratedExample]] = defaultdict(list)
        for row in rows:
            by_day[row.feedback_ts.strftime("%Y-%m-%d")].append(row)
        paths = []
        for day, day_rows in sorted(by_day.items()):
            for n, start in enumerate(range(0, len(day_rows), self._batch_size)):
                chunk = day_rows[start:start + self._batch_size]
                part = PartFile(path=f"day={day}/part-{batch:010d}-{n:03d}.parquet", day=day, batch=batch,
                                rows=len(chunk), offsets=offsets, positions=positions, created_at=datetime.now(UTC),
                                tasks=task_counts(row.task for row in chunk))
                self.dataset.write_part(part.path, chunk)
                self.state.add_part(part)
                paths.append(part.path)
        return paths

    def _prune(self, parked: bool) -> None:
        """Bound the state: old predictions every 10 min; waiting feedback also whenever some was parked."""
        limits = self.settings.feedback
        if parked:
            dropped = self.state.prune_unmatched(time.time() - limits.unmatched_retention_s, limits.max_unmatched)
            if dropped:
                self.state.bump("unmatched_dropped", dropped)
                log.warning("event=unmatched_dropped count=%d (waited over %.0f s, or over %d waiting)", dropped,
                            limits.unmatched_retention_s, limits.max_unmatched)
        if time.monotonic() - self._last_prune < 600:
            return
        self._last_prune = time.monotonic()
        pruned = self.state.prune_predictions(time.time() - limits.prediction_retention_s)
        if pruned:
            log.info("event=predictions_pruned count=%d older_than_s=%.0f", pruned, limits.prediction_retention_s)

    def close(self) -> None:
        self.source.close()
        self.state.close()


def _format_ranges(offsets: Mapping[str, tuple[int, int]]) -> str:
    return ",".join(f"{p}:{first}-{end}" for p, (first, end) in sorted(offsets.items())) or "-"


def _format_positions(positions: Mapping[str, int]) -> str:
    return ",".join(f"{p}:{n}" for p, n in sorted(positions.items())) or "-"


def state_path(settings: Settings) -> Path:
    return settings.feedback_dir / "curator" / "state.db"


# -- status -------------------------------------------------------------------------------------

class FeedbackStatus(BaseModel):
    """`flywheel feedback status`: what the curator has taken in and where the stream stands."""

    backend: Literal["kafka", "local"]
    received: int  # distinct feedback events the curator has read
    curated: int
    unmatched: int  # feedback still waiting for its prediction
    unmatched_oldest_age_s: float | None
    unmatched_dropped: int  # feedback that waited too long, or beyond `max_unmatched`
    duplicates: int
    refused: int  # feedback from someone other than the answer's asker (feedback.rater: asker)
    rejected: int  # records that were not valid events (kept in the state DB)
    predictions: int
    spooled: int  # events in this host's Kafka spool not yet delivered to the broker
    positions: dict[str, int]  # where the curator has got to, per `topic/partition`
    log_end: dict[str, int]  # local log only: where the log ends (positions == log_end: caught up)
    parts: int
    dataset: str
    curator: CuratorHealth | None  # curation as a whole (`read_health`; None: no curator ever started)
    curators: list[CuratorHealth]  # each curator's own last word, newest first
    disk_bytes: dict[str, int]  # what each store takes on disk: log, spool, state, dataset


def feedback_status(settings: Settings) -> FeedbackStatus:
    """Read-only: safe to call while a curator and publishers are running."""
    if settings.feedback.curation == "partitioned":  # no state but the commits: what they hold, where they end
        from feedback.partitioned import partitioned_dataset

        manifest = partitioned_dataset(settings).manifest()
        counters = dict.fromkeys(COUNTERS, 0) | {"curated": sum(part.rows for part in manifest.files)}
        unmatched, oldest, positions, parts = 0, None, manifest.positions, len(manifest.files)
    else:
        state = CuratorState(state_path(settings))
        try:
            counters = state.counters()
            unmatched, oldest = state.unmatched_summary()
            positions = state.positions()
            parts = len(state.parts())
        finally:
            state.close()
    kafka = bool(settings.feedback.kafka_bootstrap)
    log_dir = settings.feedback_dir / "log"
    log_end = {} if kafka else {f"{path.stem}/0": path.stat().st_size for path in sorted(log_dir.glob("*.log"))}
    spool_dir = settings.feedback_dir / "spool"
    return FeedbackStatus(
        backend="kafka" if kafka else "local",
        received=counters["received"], curated=counters["curated"], unmatched=unmatched,
        unmatched_oldest_age_s=None if oldest is None else round(time.time() - oldest, 1),
        unmatched_dropped=counters["unmatched_dropped"],
        duplicates=counters["duplicates"], refused=counters["refused"], rejected=counters["rejected"],
        predictions=counters["predictions"],
        spooled=spooled_pending(spool_dir) if spool_dir.is_dir() else 0,
        positions=positions, log_end=log_end, parts=parts, dataset=settings.dataset_uri,
        curator=read_health(settings), curators=read_curators(settings),
        disk_bytes={name: _disk_bytes(settings.feedback_dir / name) for name in ("log", "spool", "curator", "dataset")},
    )


def _disk_bytes(path: Path) -> int:
    """Allocated bytes under `path` (holes punched by the log's retention count as free)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
