"""Curation partitioned by Kafka: any number of curators in one consumer group, sharing no state.

Pairs. The bus keys every event by its request id (`KafkaBus._send_one`), so a prediction and its feedback
land in the same partition number of their two topics when both topics have the same partition count (the
curator refuses to curate otherwise). The group uses the range assignor, which gives partition i of both
topics to the same member: a curator owns *pairs* of partitions, and everything a join needs lies in the
pairs it owns. A rebalance moves pairs between curators; nothing is shared between them but the dataset.

Output: a chain of commits per pair. Each batch of a pair covers offsets [start, end) of both its
partitions, `start` being the `end` of the pair's previous commit (0, 0 for the first). It is written as
  1. Parquet parts `day=<D>/part-p<pair>-<pred start>-<pred end>-<fb start>-<fb end>.parquet` (atomic: a
     rename here, one PUT on an object store; the name follows from the range, so a rewrite of the same range
     replaces, never adds), then
  2. the commit `commits/pair=<pair>/<pred start>-<fb start>.json`, which names those parts and `end`,
     created only if that name is still free (a hard link on a disk; `If-None-Match: *` on an object store,
     which `feedback.dataset_uri` may name: curators on many machines then share no volume).
Only a commit makes rows visible: readers go through the commits (`PartitionedDataset.manifest()`, also
written to `manifest.json` by every curator after its commits). A crash before the commit leaves parts no
commit names (invisible; rewritten or removed later); a crash after it leaves a complete batch. Two
curators that both think they own a pair (mid-rebalance, or an evicted member still running) race for the
same commit name: one wins, the loser drops its cache of the pair and rebuilds it from the winner's end.
So a pair's commits form one chain from (0, 0), and every row lies in exactly one committed part.

Join state: a cache, rebuilt from the topics. What a chain ending at E = (pred end, fb end) holds follows from
offsets alone: a feedback event joined to its prediction is in the chain iff both records lie before E (the
join happens as soon as both halves have been read, in whatever order the two partitions are read; of
redelivered copies of an event, the first in offset order is the one joined). So a curator that takes a pair
over seeks both partitions to their beginning, replays them through an empty cache, keeps only the joins with
a record at or after E, and commits nothing until both partitions are read up to E (a commit's end says that
everything before it was read; one side read ahead must not claim the other). Nothing is stored but the topics
and the chain: no SQLite, nothing a network filesystem must lock. A takeover re-reads what the topics retain
(keep their retention near `prediction_retention_s`, which bounds the cache anyway); a snapshot of the cache
beside the commits would make takeovers cheaper. The group's committed offsets are set to each commit's end
for lag monitoring and never read back. An erasure (`flywheel users forget`) rewrites the parts that held a
user's rows and records their new counts in `erasures/<time>-<id>.json`, which the manifest lays over the
commits (commits never change). Pruning (`prediction_retention_s`, `unmatched_retention_s`,
`max_unmatched` per pair) goes by event time, so a replay decides as the original did except for events
at those limits: it may then drop a join the original would have made later, never write one twice.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import pyarrow as pa
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from pydantic import BaseModel

from feedback.bus import kafka_client_config
from feedback.curator import (
    PROGRESS_EVERY_S,
    BatchResult,
    Curator,
    Located,
    SourceRecord,
    decoded,
    join,
    may_rate,
)
from feedback.dataset import (
    MANIFEST,
    SCHEMA,
    CuratedDataset,
    Manifest,
    PartFile,
    parquet_bytes,
)
from feedback.pii import mask_event
from feedback.schemas import CuratedExample, FeedbackEvent, PredictionEvent
from feedback.supervisor import report_lag
from flywheel.config import Settings
from flywheel.store import CommitConflict, put_whole

log = logging.getLogger("flywheel.feedback.partitioned")

COMMITS = "commits"
PREDICTIONS, FEEDBACK = 0, 1  # a pair's sides, the index into every (predictions, feedback) tuple
Offsets = tuple[int, int]
_PART = re.compile(r"day=[^/]+/part-p(\d+)-(\d+)-(\d+)-(\d+)-(\d+)\.parquet")
_COMMIT = re.compile(rf"{COMMITS}/pair=\d+/\d+-\d+\.json")
ERASURES = "erasures"
_ERASURE = re.compile(rf"{ERASURES}/[0-9T]+-[0-9a-f]+\.json")


class ErasedParts(BaseModel):
    """Parts an erasure rewrote, with what they hold now."""

    files: list[PartFile]


class PartitionMismatch(ValueError):
    """The two topics have different partition counts: a prediction and its feedback may not meet."""


_Record = TypeVar("_Record", bound=BaseModel)


class PairCommit(BaseModel):
    """One committed batch of a pair: the parts it wrote and the offsets [start, end) it covered."""

    pair: int
    start: Offsets  # (predictions offset, feedback offset)
    end: Offsets
    files: list[PartFile]
    created_at: datetime


def part_name(pair: int, day: str, start: Offsets, end: Offsets) -> str:
    return (f"day={day}/part-p{pair:04d}-{start[PREDICTIONS]:012d}-{end[PREDICTIONS]:012d}"
            f"-{start[FEEDBACK]:012d}-{end[FEEDBACK]:012d}.parquet")


def commit_name(pair: int, start: Offsets) -> str:
    return f"{COMMITS}/pair={pair:04d}/{start[PREDICTIONS]:012d}-{start[FEEDBACK]:012d}.json"


class PartitionedDataset:
    """The curated dataset as chains of commits, one chain per pair; see the module docstring."""

    def __init__(self, root: Path | str, predictions_topic: str, feedback_topic: str,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.curated = CuratedDataset(root, storage_options)
        self.fs, self.root = self.curated.fs, self.curated.root
        self._topics = (predictions_topic, feedback_topic)
        self._read: dict[str, PairCommit] = {}  # commits never change: each is read once
        self._erasures: dict[str, ErasedParts] = {}  # nor do erasure records

    def sources(self, pair: int) -> tuple[str, str]:
        return f"{self._topics[PREDICTIONS]}/{pair}", f"{self._topics[FEEDBACK]}/{pair}"

    def commits(self, pair: int | None = None) -> list[PairCommit]:
        """The committed batches (of one pair), in chain order."""
        folder = COMMITS if pair is None else f"{COMMITS}/pair={pair:04d}"
        keys = self._find(folder, _COMMIT)
        self._read |= self._read_new(keys, self._read, PairCommit)
        return sorted((self._read[key] for key in keys), key=lambda commit: (commit.pair, commit.start))

    def _read_new(self, keys: list[str], known: Mapping[str, Any], model: type[_Record]) -> dict[str, _Record]:
        """The records of `keys` not in `known`, read in one batch (an object store's client fetches them at
        once: one GET after the other took 35 s for 10 000 commits on moto's server)."""
        unread = {self.curated.path(key): key for key in keys if key not in known}
        fetched = self.fs.cat(list(unread)) if unread else {}
        return {unread[path]: model.model_validate_json(data) for path, data in fetched.items()}

    def record_erasure(self, rewritten: list[PartFile]) -> None:
        """Say what the parts an erasure rewrote hold now (their commits keep what they held when committed)."""
        name = f"{ERASURES}/{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:12]}.json"
        put_whole(self.fs, self.curated.path(name), ErasedParts(files=rewritten).model_dump_json().encode(),
                  exclusive=True)

    def _erased(self) -> dict[str, PartFile]:
        """Each part an erasure rewrote, as the latest erasure left it."""
        current: dict[str, PartFile] = {}
        keys = sorted(self._find(ERASURES, _ERASURE))
        self._erasures |= self._read_new(keys, self._erasures, ErasedParts)
        for key in keys:
            current |= {part.path: part for part in self._erasures[key].files}
        return current

    def write_batch(self, pair: int, start: Offsets, end: Offsets, rows: list[CuratedExample],
                    sequence: int) -> PairCommit:
        """Write the parts of one batch, then commit them; CommitConflict if `start` was committed already."""
        by_day: dict[str, list[CuratedExample]] = defaultdict(list)
        for row in rows:
            by_day[row.feedback_ts.strftime("%Y-%m-%d")].append(row)
        predictions, feedback = self.sources(pair)
        offsets = {predictions: (start[PREDICTIONS], end[PREDICTIONS]), feedback: (start[FEEDBACK], end[FEEDBACK])}
        positions = {predictions: end[PREDICTIONS], feedback: end[FEEDBACK]}
        now = datetime.now(UTC)
        files = []
        for day, day_rows in sorted(by_day.items()):
            name = part_name(pair, day, start, end)
            table = pa.Table.from_pylist([row.model_dump() for row in day_rows], schema=SCHEMA)
            put_whole(self.fs, self.curated.path(name), parquet_bytes(table), exclusive=False)
            files.append(PartFile(path=name, day=day, batch=sequence, rows=len(day_rows), offsets=offsets,
                                  positions=positions, created_at=now))
        commit = PairCommit(pair=pair, start=start, end=end, files=files, created_at=now)
        put_whole(self.fs, self.curated.path(commit_name(pair, start)), commit.model_dump_json(indent=1).encode(),
               exclusive=True)
        return commit

    def parts(self) -> list[str]:
        """Every part written, committed or not."""
        return self._find("", _PART)

    def _find(self, folder: str, name: re.Pattern[str]) -> list[str]:
        """Files under `folder` (relative to the root) whose relative path matches `name`, listed afresh: an
        object store's cached listing would miss what other curators wrote since."""
        self.fs.invalidate_cache()
        listed = self.fs.find(self.curated.path(folder) if folder else self.root)
        found = (path.removeprefix(f"{self.root}/") for path in listed)
        return [relative for relative in found if name.fullmatch(relative)]

    def remove_orphans(self, pair: int, chain: Iterable[PairCommit]) -> list[str]:
        """Delete parts of `pair` that no commit names and none ever can: another batch was committed from
        their start. (A part from the chain's end on may still be committed by a curator finishing a batch.)"""
        chain = list(chain)
        named = {part.path for commit in chain for part in commit.files}
        taken = {commit.start for commit in chain}
        removed = []
        for relative in self.parts():
            match = _PART.fullmatch(relative)
            if match and int(match[1]) == pair and relative not in named and (int(match[2]), int(match[4])) in taken:
                with contextlib.suppress(FileNotFoundError):  # another curator removed it first
                    self.fs.rm_file(self.curated.path(relative))
                removed.append(relative)
        return removed

    def manifest(self) -> Manifest:
        """Every committed part, oldest first, and where each pair's chain ends."""
        commits = self.commits()
        positions: dict[str, int] = {}
        for commit in commits:  # chain order: the last commit of a pair has its end
            predictions, feedback = self.sources(commit.pair)
            positions[predictions], positions[feedback] = commit.end
        erased = self._erased()
        in_order = sorted(commits, key=lambda c: (c.created_at, c.pair, c.start))
        files = [erased.get(part.path, part) for commit in in_order for part in commit.files]
        return Manifest(updated_at=datetime.now(UTC), positions=positions, files=files)

    def publish_manifest(self) -> Manifest:
        """Write `manifest.json` for readers that read it (concurrent curators: the last write wins, and any
        later write includes all it missed)."""
        manifest = self.manifest()
        try:
            current = [(part.path, part.rows) for part in self.curated.manifest().files]
        except ValueError:  # not written by this code: replace it
            current = None
        if [(part.path, part.rows) for part in manifest.files] != current:  # a commit or an erasure since
            put_whole(self.fs, self.curated.path(MANIFEST), manifest.model_dump_json(indent=1).encode(),
                      exclusive=False)
        return manifest


class PairState:
    """The join cache of one pair: predictions waiting for feedback, feedback waiting for its prediction."""

    def __init__(self, pair: int, chain_end: Offsets, sequence: int) -> None:
        self.pair = pair
        self.chain_end = chain_end  # what the chain holds: joins with both records before it
        self.sequence = sequence  # commits in the chain
        self.next: list[int | None] = [None, None]  # next offset to read; None: from the beginning
        self.predictions: dict[str, Located[PredictionEvent]] = {}
        self.joined: dict[str, set[str]] = {}  # request id -> ids of the feedback joined to it
        self.waiting: dict[str, list[Located[FeedbackEvent]]] = {}
        self.waiting_ids: set[str] = set()
        self.pending: list[CuratedExample] = []  # joins not committed yet

    def replayed(self) -> bool:
        """Both partitions read up to the chain's end. Only then may a batch be committed: its end claims that
        every record before it has been read, and the chain's rule (both halves before the end) relies on it."""
        return all((read or 0) >= done for done, read in zip(self.chain_end, self.next, strict=True))

    def already_read(self, feedback: FeedbackEvent) -> bool:
        return feedback.event_id in self.waiting_ids or feedback.event_id in self.joined.get(feedback.request_id, ())

    def park(self, feedback: Located[FeedbackEvent]) -> None:
        self.waiting.setdefault(feedback.event.request_id, []).append(feedback)
        self.waiting_ids.add(feedback.event.event_id)

    def take_waiting(self, request_id: str) -> list[Located[FeedbackEvent]]:
        waiting = self.waiting.pop(request_id, [])
        self.waiting_ids.difference_update(f.event.event_id for f in waiting)
        return waiting

    def prune(self, predictions_before: float, waiting_before: float, max_waiting: int) -> int:
        """Forget old predictions; drop feedback that waited too long or beyond `max_waiting`. How many dropped."""
        old = [r for r, p in self.predictions.items() if p.event.timestamp.timestamp() < predictions_before]
        for request_id in old:
            del self.predictions[request_id]
            self.joined.pop(request_id, None)
        waiting = sorted((f for fs in self.waiting.values() for f in fs), key=lambda f: f.event.timestamp)
        drop = [f for f in waiting if f.event.timestamp.timestamp() < waiting_before]
        kept = len(waiting) - len(drop)
        if kept > max_waiting:
            drop += [f for f in waiting if f.event.timestamp.timestamp() >= waiting_before][:kept - max_waiting]
        for feedback in drop:
            fellows = self.waiting[feedback.event.request_id]
            fellows.remove(feedback)
            if not fellows:
                del self.waiting[feedback.event.request_id]
            self.waiting_ids.discard(feedback.event.event_id)
        return len(drop)

    def end(self) -> Offsets:
        """Where a batch committed now ends: past everything read, never before the chain's end."""
        return cast(Offsets, tuple(max(done, read or 0) for done, read in zip(self.chain_end, self.next, strict=True)))


class _Rebalanced(ConsumerRebalanceListener):
    """Notes that the group moved partitions; the curator acts on it between polls, in its own thread."""

    def __init__(self, flag: threading.Event) -> None:
        self._flag = flag

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._flag.set()

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._flag.set()


PRUNE_EVERY_S = 60.0
MANIFEST_EVERY_S = 5.0
MANIFEST_GAP = 9.0  # times the last publication's length, between two


class PartitionedCurator:
    """One member of the curators' consumer group. Drive it like `Curator`: `run(stop)`, `drain()`, `run_once()`."""

    def __init__(self, settings: Settings, *, session_timeout_ms: int = 10_000) -> None:
        fs = settings.feedback
        self.settings = settings
        self._topics = (fs.predictions_topic, fs.feedback_topic)
        self._batch_size = fs.curator_batch_size
        self._flush_s = fs.curator_flush_s
        self.dataset = partitioned_dataset(settings)
        self._pairs: dict[int, PairState] = {}
        self._rebalanced = threading.Event()
        self._last_prune = time.monotonic()
        self._manifest_written = float("-inf")
        self._manifest_gap_s = 0.0  # between two publications of the manifest: see _publish_manifest
        self._reported = float("-inf")
        self._newest_read_ts = time.time()  # the newest record read: with records behind it, the lag's age
        self._consumer = KafkaConsumer(
            **kafka_client_config(fs),
            group_id=fs.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=[RangePartitionAssignor],  # partition i of both topics, one member
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=session_timeout_ms // 4,
            fetch_max_wait_ms=200,
        )
        self._consumer.subscribe(list(self._topics), listener=_Rebalanced(self._rebalanced))
        log.info("event=curator_started mode=partitioned group=%s topics=%s", fs.consumer_group, ",".join(self._topics))

    @property
    def pairs(self) -> list[int]:
        """The pairs this curator owns now."""
        return sorted(self._pairs)

    def _tps(self, pair: int) -> tuple[TopicPartition, TopicPartition]:
        return TopicPartition(self._topics[PREDICTIONS], pair), TopicPartition(self._topics[FEEDBACK], pair)

    # -- ownership ---------------------------------------------------------------------------

    def _check_partitions(self) -> None:
        counts = [len(self._consumer.partitions_for_topic(topic)) for topic in self._topics]
        if counts[PREDICTIONS] != counts[FEEDBACK]:
            raise PartitionMismatch(
                f"{self._topics[PREDICTIONS]} has {counts[PREDICTIONS]} partitions and {self._topics[FEEDBACK]} "
                f"{counts[FEEDBACK]}: give both the same count, or a prediction and its feedback may never meet")

    def _take_assignment(self) -> None:
        """After a rebalance: forget the pairs that went, take over the new ones, keep reading the kept ones."""
        self._check_partitions()
        assigned = self._consumer.assignment()
        owned = {tp.partition for tp in assigned
                 if tp.topic == self._topics[PREDICTIONS] and self._tps(tp.partition)[FEEDBACK] in assigned}
        halves = sorted(f"{tp.topic}/{tp.partition}" for tp in assigned if tp.partition not in owned)
        if halves:
            log.error("event=half_pairs_assigned partitions=%s (is every member using the range assignor?)",
                      ",".join(halves))
        for pair in sorted(set(self._pairs) - owned):
            del self._pairs[pair]
            log.info("event=pair_released pair=%d", pair)
        for pair in sorted(owned):
            state = self._pairs.get(pair)
            if state is None:
                self._take_over(pair)
                continue
            for side, tp in enumerate(self._tps(pair)):  # the group reset positions to its offsets: go on from ours
                position = state.next[side]
                if position is None:
                    self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, position)

    def _restart(self, pair: int | None = None) -> None:
        """Before the next batch: forget `pair` (None: none), take over again whatever is owned but not cached
        (from its chain's end), and read every other pair again from where its cache stopped. So nothing a failed
        batch polled is skipped, and no cache keeps records that a failure left half applied."""
        if pair is not None:
            self._pairs.pop(pair, None)
        self._rebalanced.set()

    def _take_over(self, pair: int) -> None:
        """Start a pair from the end of its chain, its cache rebuilt by replaying both partitions."""
        chain = self.dataset.commits(pair)
        chain_end: Offsets = chain[-1].end if chain else (0, 0)
        removed = self.dataset.remove_orphans(pair, chain)
        self._pairs[pair] = PairState(pair, chain_end, len(chain))
        self._consumer.seek_to_beginning(*self._tps(pair))
        log.info("event=pair_taken pair=%d chain_end=%d,%d commits=%d orphans_removed=%d", pair, *chain_end,
                 len(chain), len(removed))

    # -- curating ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Curate until `stop` is set. A failed pair's cache is dropped and rebuilt from the topics."""
        backoff = 0.5
        while not stop.is_set():
            try:
                self.run_once(timeout_s=0.5)
                backoff = 0.5
            except Exception:  # broker, disk or a bug: nothing of the failed pair was committed
                log.exception("event=batch_failed retry_in_s=%.1f", backoff)
                self._restart()
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            self._publish_manifest_if_due(committed=False)  # other curators' commits
            if time.monotonic() - self._reported > PROGRESS_EVERY_S:
                self._report_progress()

    def _report_progress(self) -> None:
        """How far behind this curator is on the pairs it owns (for /healthz and `flywheel feedback status`)."""
        behind = 0
        for pair, state in list(self._pairs.items()):
            for tp, read in zip(self._tps(pair), state.next, strict=True):
                highwater = self._consumer.highwater(tp)  # from the last fetch: no request to the broker
                behind += max(0, highwater - (read or 0)) if highwater is not None else 0
        report_lag(self.settings, behind, max(0.0, time.time() - self._newest_read_ts) if behind else 0.0)
        self._reported = time.monotonic()

    def drain(self, timeout_s: float = 120.0) -> BatchResult:
        """Curate until this curator's pairs are read to their end; TimeoutError if that takes over `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        total = BatchResult()
        while True:
            result = self.run_once(timeout_s=0.5)
            total = total.merge(result)
            if not result.records and self.caught_up():
                self._publish_manifest()
                return total
            if time.monotonic() > deadline:
                raise TimeoutError(f"curator did not catch up within {timeout_s:.0f}s ({total.curated} curated)")

    def caught_up(self) -> bool:
        assignment = self._consumer.assignment()
        if not assignment or self._rebalanced.is_set():
            return False
        for tp in assignment:
            highwater = self._consumer.highwater(tp)
            try:
                position = self._consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                return False
            if highwater is None or position is None or position < highwater:
                return False
        return True

    def _poll(self, max_records: int, timeout_s: float) -> list[tuple[TopicPartition, Any]]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [(tp, record) for tp, records in batches.items() for record in records]

    def run_once(self, timeout_s: float | None = None) -> BatchResult:
        """Poll one batch (as `Curator.run_once`) and curate it, pair by pair; each pair commits on its own."""
        records = self._poll(self._batch_size, self._flush_s if timeout_s is None else timeout_s)
        if records:
            deadline = time.monotonic() + self._flush_s
            while len(records) < self._batch_size and (left := deadline - time.monotonic()) > 0:
                records += self._poll(self._batch_size - len(records), left)
        if self._rebalanced.is_set():  # positions moved under these records: read them again
            self._take_assignment()  # if this raises (PartitionMismatch), the next batch tries again
            self._rebalanced.clear()
            return BatchResult()
        result = BatchResult(records=len(records))
        if records:  # a broker before 0.10 keeps no timestamps: the time they were read, then
            stamps = [r.timestamp / 1000 for _, r in records if r.timestamp is not None and r.timestamp >= 0]
            self._newest_read_ts = max(self._newest_read_ts, *stamps) if stamps else time.time()
        by_pair: dict[int, list[tuple[int, SourceRecord]]] = defaultdict(list)
        for tp, record in records:
            side = PREDICTIONS if tp.topic == self._topics[PREDICTIONS] else FEEDBACK
            by_pair[tp.partition].append(
                (side, SourceRecord(f"{tp.topic}/{tp.partition}", record.offset, record.offset + 1, record.value)))
        committed, failure = False, None
        for pair, pair_records in sorted(by_pair.items()):
            state = self._pairs.get(pair)
            if state is None:
                continue
            try:
                committed |= self._curate_pair(state, pair_records, result)
            except Exception as exc:
                if isinstance(exc, CommitConflict):  # another curator committed first
                    log.warning("event=commit_conflict pair=%d commit=%s", pair, exc)
                else:
                    log.error("event=pair_failed pair=%d error=%r", pair, exc)
                    failure = failure or exc
                self._restart(pair)
        self._prune()
        if committed:
            self._publish_manifest_if_due(committed=True)
        if failure is not None:  # every pair had its turn; now let `run` pause
            raise failure
        return result

    def _curate_pair(self, state: PairState, records: list[tuple[int, SourceRecord]], result: BatchResult) -> bool:
        for side, record in records:
            position = state.next[side]
            if position is not None and record.offset < position:
                continue  # read twice (a seek back): the cache has it
            state.pending += self._apply(state, record, result)
            state.next[side] = record.next_offset
        if not state.pending or not state.replayed():
            return False  # nothing to lose: a takeover replays these records anyway
        rows, start, end = state.pending, state.chain_end, state.end()
        commit = self.dataset.write_batch(state.pair, start, end, rows, state.sequence)
        state.chain_end, state.sequence, state.pending = end, state.sequence + 1, []
        result.curated += len(rows)
        result.files += [part.path for part in commit.files]
        for side, source in enumerate(self.dataset.sources(state.pair)):
            result.offsets[source] = (start[side], end[side])
        try:  # for lag monitoring only: a takeover starts from the chain, never from these
            self._consumer.commit({tp: OffsetAndMetadata(end[side], "", -1)
                                   for side, tp in enumerate(self._tps(state.pair))})
        except KafkaError as exc:
            log.warning("event=offset_commit_failed pair=%d error=%r", state.pair, exc)
        log.info("event=curated pair=%d rows=%d range=%d-%d,%d-%d files=%s", state.pair, len(rows), start[0], end[0],
                 start[1], end[1], ",".join(part.path for part in commit.files))
        return True

    def _apply(self, state: PairState, record: SourceRecord, result: BatchResult) -> list[CuratedExample]:
        event = decoded(record)
        if isinstance(event, str):
            result.rejected += 1
            return []
        joins: list[tuple[Located[FeedbackEvent], Located[PredictionEvent]]] = []
        if isinstance(event, PredictionEvent):
            result.predictions += 1
            if event.request_id in state.predictions:
                return []  # a redelivered copy
            prediction = Located(cast(PredictionEvent, mask_event(event)), record.partition, record.offset)
            state.predictions[event.request_id] = prediction
            state.joined.setdefault(event.request_id, set())
            joins = [(feedback, prediction) for feedback in state.take_waiting(event.request_id)]
        else:
            result.feedback += 1
            if state.already_read(event):
                result.duplicates += 1
                return []
            feedback = Located(cast(FeedbackEvent, mask_event(event)), record.partition, record.offset)
            found = state.predictions.get(event.request_id)
            if found is None:
                state.park(feedback)
                result.unmatched += 1
                return []
            joins = [(feedback, found)]
        rows = []
        for feedback, prediction in joins:
            if not may_rate(self.settings, feedback, prediction):
                result.refused += 1
                continue
            state.joined[prediction.event.request_id].add(feedback.event.event_id)
            if prediction.offset < state.chain_end[PREDICTIONS] and feedback.offset < state.chain_end[FEEDBACK]:
                continue  # both halves before the chain's end: the chain holds this row already
            rows.append(join(feedback, prediction, self.settings.default_task))
        return rows

    def _prune(self) -> None:
        if time.monotonic() - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = time.monotonic()
        limits, now = self.settings.feedback, time.time()
        for state in self._pairs.values():
            dropped = state.prune(now - limits.prediction_retention_s, now - limits.unmatched_retention_s,
                                  limits.max_unmatched)
            if dropped:
                log.warning("event=unmatched_dropped pair=%d count=%d", state.pair, dropped)

    def _publish_manifest_if_due(self, *, committed: bool) -> None:
        """After this curator's commit, as soon as the gap since the last publication has passed; otherwise (for
        other curators' commits) every MANIFEST_EVERY_S, or the gap if it is longer."""
        due = self._manifest_gap_s if committed else max(MANIFEST_EVERY_S, self._manifest_gap_s)
        if time.monotonic() - self._manifest_written >= due:
            self._publish_manifest()

    def _publish_manifest(self) -> None:
        """Publish the manifest (every commit listed). The listing grows with the dataset (2 s for 10 000 commits
        on moto's server), so the next publication waits MANIFEST_GAP times as long as this one took: at most
        about a tenth of the curator's time goes to it, and readers see new commits that much later."""
        started = time.monotonic()
        try:
            self.dataset.publish_manifest()
        except OSError as exc:  # readers can list the commits themselves; the next write catches up
            log.warning("event=manifest_write_failed error=%r", exc)
        self._manifest_written = time.monotonic()
        self._manifest_gap_s = MANIFEST_GAP * (self._manifest_written - started)

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def partitioned_dataset(settings: Settings) -> PartitionedDataset:
    """The chains of commits where `feedback.dataset_uri` puts the curated dataset."""
    feedback = settings.feedback
    return PartitionedDataset(settings.dataset_uri, feedback.predictions_topic, feedback.feedback_topic,
                              feedback.dataset_storage_options)


def build_curator(settings: Settings) -> Curator | PartitionedCurator:
    """The curator `feedback.curation` asks for."""
    if settings.feedback.curation == "partitioned":
        return PartitionedCurator(settings)
    return Curator(settings)
