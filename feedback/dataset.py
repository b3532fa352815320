"""The curated dataset: Parquet parts partitioned by day, and a manifest of what each part covers.

Layout under `feedback.dataset_uri` (default `<feedback_dir>/dataset`; partitioned curation may put it on an
object store, read and written through fsspec): `day=YYYY-MM-DD/part-<batch>-<n>.parquet` and `manifest.json`.
Parts are written atomically (temp file, fsync, rename). The curator lists a part in its state in the
same transaction that records the positions it consumed, then rewrites the manifest from that state,
so the manifest names only committed parts: readers go through it and never see a part from a batch
that crashed before its commit (the curator deletes such leftovers when it starts).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field

from feedback.review import REVIEWS_FOLDER, ReviewLog
from feedback.schemas import CuratedExample
from flywheel.config import Settings
from flywheel.store import put_whole, write_new

MANIFEST = "manifest.json"
THUMB_RATING = {"up": 5, "down": 1}  # a thumb on the rating scale, where ratings and thumbs are compared

_TIMESTAMP = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("event_id", pa.string()), ("request_id", pa.string()), ("task", pa.string()),
    ("feedback_ts", _TIMESTAMP), ("prediction_ts", _TIMESTAMP),
    ("adapter_version", pa.string()), ("prompt_kind", pa.string()), ("prompt", pa.string()),
    ("answer", pa.string()), ("reasoning", pa.string()),
    ("rating", pa.int8()), ("thumb", pa.string()), ("correction", pa.string()), ("comment", pa.string()),
    ("user_id", pa.string()), ("tenant_id", pa.string()),
    ("rater", pa.string()), ("authenticated", pa.bool_()), ("asker", pa.string()),
    ("feedback_source", pa.string()), ("feedback_offset", pa.int64()),
    ("prediction_source", pa.string()), ("prediction_offset", pa.int64()),
])


class PartFile(BaseModel):
    """One Parquet part and the source positions of the batch that produced it."""

    path: str = Field(description="Relative to the dataset root, e.g. day=2026-01-31/part-0000000007-000.parquet")
    day: str
    batch: int
    rows: int
    offsets: dict[str, tuple[int, int]] = Field(
        description="`topic/partition` -> [first, next) Kafka offsets or local-log byte positions its batch "
        "consumed (a row's other half may come from an earlier batch)."
    )
    positions: dict[str, int] = Field(
        description="Next position per `topic/partition` once its batch was committed: every row of this part "
        "and of the parts before it lies before these (`read_table(until=...)`)."
    )
    created_at: datetime
    tasks: dict[str, int] | None = Field(
        None, description="Rows per task in this part (None in parts written before it was kept: read from the part).")

    def after(self, positions: Mapping[str, int]) -> bool:
        """Whether this part was committed after a snapshot taken at `positions` (a manifest's `positions`)."""
        return any(position > positions.get(source, 0) for source, position in self.positions.items())


def task_counts(tasks: Iterable[str]) -> dict[str, int]:
    """Rows per task, for a part's `tasks`."""
    return dict(Counter(tasks))


class Manifest(BaseModel):
    schema_version: Literal[1] = 1
    updated_at: datetime
    positions: dict[str, int] = Field(
        default_factory=dict, description="Next position per `topic/partition`: all before it is curated."
    )
    files: list[PartFile] = Field(default_factory=list)


def parquet_bytes(table: pa.Table) -> bytes:
    """A Parquet file of `table`, whole, for a store that takes a file in one put."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return cast(bytes, sink.getvalue().to_pybytes())


def current_verdicts(rows: Iterable[CuratedExample]) -> list[CuratedExample]:
    """One verdict per rater per answer: a rater's later rating or correction of the same request replaces the
    earlier one (last write wins), whatever its event id. Order kept, by each verdict's latest row."""
    latest: dict[tuple[str, str], CuratedExample] = {}
    for row in rows:
        key = (row.request_id, row.rater or f"event:{row.event_id}")
        if key not in latest or latest[key].feedback_ts <= row.feedback_ts:
            latest.pop(key, None)  # re-insert: the order follows the newest verdict
            latest[key] = row
    return list(latest.values())


def canary_ratings(settings: Settings, dataset: CuratedDataset | None = None
                   ) -> Callable[[str, datetime], list[tuple[str, float, str | None]]]:
    """`(task, since)` -> the ratings a task's canary is judged on (`canary.count_anonymous` says whose count): what
    the controller, the admin API, the console and the CLI all review it with (`dataset`: a reader to share)."""
    dataset = dataset or curated_dataset(settings)
    return lambda task, since: dataset.ratings(task, since, anonymous=settings.canary.count_anonymous)


class DayRating(BaseModel):
    """One version's ratings on one day."""

    day: date
    mean: float = Field(description="Mean rating, 1-5 (a thumb up counts 5, down 1).")
    ratings: int


DailyRatings = dict[str, list[DayRating]]  # adapter version -> its days, oldest first


class _Rating(NamedTuple):
    at: datetime
    task: str
    version: str
    value: float
    rater: str | None


class _RatedRow(NamedTuple):
    """A part's row that carries a rating, in the columns ratings are counted from."""

    at: datetime
    task: str
    version: str
    value: float
    rater: str | None
    authenticated: bool
    event_id: str
    request_id: str


RATED_COLUMNS = ["event_id", "request_id", "task", "feedback_ts", "adapter_version", "rating", "thumb", "rater",
                 "authenticated"]


def curated_dataset(settings: Settings) -> CuratedDataset:
    """The curated dataset where `feedback.dataset_uri` puts it, its review log beside it."""
    return CuratedDataset(settings.dataset_uri, settings.feedback.dataset_storage_options,
                          legacy_reviews=settings.feedback_dir / "review.jsonl")


class CuratedDataset:
    """Writer (for the curator) and reader (for the learning plane and `flywheel feedback export`).

    Readers see the current verdicts: one per rater per answer, retracted rows (feedback.review) left out.
    """

    def __init__(self, root: Path | str, storage_options: dict[str, Any] | None = None,
                 legacy_reviews: Path | None = None) -> None:
        """`root`: a local path or an fsspec URL; `legacy_reviews`: an older home's review log, adopted into the
        one beside the dataset (default: beside a local `root`)."""
        self.fs, self.root = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.arrow_fs = None if self.is_local else self.fs  # pyarrow reads local paths natively
        self.reviews = ReviewLog(self.fs, self.path(REVIEWS_FOLDER), legacy_reviews or (
            Path(self.root).parent / "review.jsonl" if self.is_local else None))
        self._counts: dict[tuple[str, int], dict[str, int]] = {}  # rows per task of parts that do not say
        # the rated rows of each part read for ratings: a committed part changes only when an erasure rewrites it
        # (fewer rows, a new file), so polling readers (the canary controller, the console) read each part once
        self._rated_rows: dict[tuple[str, int, str], list[_RatedRow]] = {}

    # -- writing -------------------------------------------------------------------------------

    def path(self, relative: str) -> str:
        """Where a file of the dataset is on its store (`fs`)."""
        return f"{self.root}/{relative}"

    def write_part(self, relative_path: str, rows: list[CuratedExample]) -> None:
        self.write_table(relative_path, pa.Table.from_pylist([row.model_dump() for row in rows], schema=SCHEMA))

    def write_table(self, relative_path: str, table: pa.Table) -> None:
        self._put(relative_path, parquet_bytes(table))

    def write_manifest(self, manifest: Manifest) -> None:
        self._put(MANIFEST, manifest.model_dump_json(indent=1).encode())

    def _put(self, relative_path: str, data: bytes) -> None:
        """Replace a file whole: readers see the old one or the new one."""
        put_whole(self.fs, self.path(relative_path), data, exclusive=False)

    def remove_unlisted(self, listed: Iterable[str]) -> list[str]:
        """Delete parts (and temp files) the manifest does not name: leftovers of a crashed batch (the single
        curator's, whose dataset is on a local disk)."""
        keep = set(listed)
        removed = []
        root = Path(self.root)
        for path in sorted(root.glob("day=*/*")):
            relative = path.relative_to(root).as_posix()
            if relative not in keep:
                path.unlink()
                removed.append(relative)
        return removed

    # -- reading -------------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        try:  # read, not listed first: an object store's listings may be cached
            text = self.fs.cat_file(self.path(MANIFEST))
        except FileNotFoundError:
            return Manifest(updated_at=datetime.now(UTC))
        return Manifest.model_validate_json(text)

    def read_part(self, relative_path: str, **options: Any) -> pa.Table:
        """One part's rows; `options` as pyarrow's `read_table` takes them (columns, filters)."""
        return pq.read_table(self.path(relative_path), schema=SCHEMA, filesystem=self.arrow_fs, **options)

    def read_table(self, manifest: Manifest | None = None, until: Mapping[str, int] | None = None) -> pa.Table:
        """Rows of the parts `manifest` names (default: the current one), PII already masked.

        `until` (`topic/partition` -> position, e.g. a training snapshot's `manifest.positions`) keeps
        only rows whose feedback and prediction records both lie before those positions.
        """
        manifest = manifest or self.manifest()
        tables = [self._read_part(part, until) for part in manifest.files]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def _read_part(self, part: PartFile, until: Mapping[str, int] | None, task: str | None = None) -> pa.Table:
        table = self.read_part(part.path)
        if task is not None:
            table = table.filter(pc.equal(table["task"], task))
        if until is None:
            return table
        columns = table.select(["feedback_source", "feedback_offset", "prediction_source", "prediction_offset"])
        keep = [offset_f < until.get(source_f, 0) and offset_p < until.get(source_p, 0)
                for source_f, offset_f, source_p, offset_p in zip(*columns.to_pydict().values(), strict=True)]
        return table.filter(pa.array(keep, type=pa.bool_()))

    def rows_by_task(self, manifest: Manifest | None = None, after: Mapping[str, int] | None = None
                     ) -> dict[str, int]:
        """Curated rows per task, from the manifest's per-part counts; `after`: only the parts committed after a
        snapshot taken at those positions (a retrain's `snapshot_positions`), i.e. the rows it never saw.

        A part written before parts kept their counts is read once (its task column only) and remembered."""
        manifest = manifest or self.manifest()
        counts: Counter[str] = Counter()
        for part in manifest.files:
            if after is None or part.after(after):
                counts.update(part.tasks if part.tasks is not None else self._counted(part))
        return dict(counts)

    def _counted(self, part: PartFile) -> dict[str, int]:
        key = (part.path, part.rows)  # an erasure rewrites a part with fewer rows
        if key not in self._counts:
            column = self.read_part(part.path, columns=["task"])["task"]
            self._counts[key] = {e["values"]: e["counts"] for e in pc.value_counts(column).to_pylist()}
        return self._counts[key]

    def examples(self, manifest: Manifest | None = None, until: Mapping[str, int] | None = None,
                 task: str | None = None, newest: int | None = None) -> list[CuratedExample]:
        """Curated rows, all tasks' or (`task`) one task's: each task retrains on its own feedback only.

        `newest` keeps only the latest N rows, reading parts newest first and stopping there, so what a
        retrain holds in memory is bounded however long the history grows.
        """
        manifest = manifest or self.manifest()
        tables, count = [], 0
        for part in reversed(manifest.files):
            tables.append(self._read_part(part, until, task))
            count += tables[-1].num_rows
            if newest is not None and count >= newest:
                break
        table = pa.concat_tables(tables[::-1]) if tables else SCHEMA.empty_table()
        if newest is not None:
            table = table.slice(max(0, table.num_rows - newest))
        retracted = self.reviews.retracted()
        return current_verdicts(CuratedExample.model_validate(row) for row in table.to_pylist()
                                if row["event_id"] not in retracted)

    def ratings(self, task: str, since: datetime, manifest: Manifest | None = None, *, anonymous: bool = False
                ) -> list[tuple[str, float, str | None]]:
        """(adapter version, rating 1-5, rater) of `task`'s answers rated at or after `since` by authenticated raters
        (`anonymous`: by anyone), one per rater per answer (their latest), retracted ones left out; a thumb up counts
        5, down 1."""
        return [(r.version, r.value, r.rater) for r in self._rated(since, task, manifest, anonymous=anonymous)]

    def daily_ratings(self, since: datetime, task: str | None = None, manifest: Manifest | None = None, *,
                      anonymous: bool = True) -> dict[str, DailyRatings]:
        """Task -> adapter version -> mean rating per day (by day, from `since`'s day), counted as `ratings` counts:
        every task's at once, or (`task`) one task's."""
        sums: dict[tuple[str, str, date], list[float]] = {}
        for r in self._rated(since, task, manifest, anonymous=anonymous):
            sums.setdefault((r.task, r.version, r.at.date()), []).append(r.value)
        by_task: dict[str, DailyRatings] = {}
        for (name, version, day), values in sorted(sums.items(), key=lambda item: item[0][2]):
            by_task.setdefault(name, {}).setdefault(version, []).append(
                DayRating(day=day, mean=sum(values) / len(values), ratings=len(values)))
        return by_task

    def _rated(self, since: datetime, task: str | None, manifest: Manifest | None, *, anonymous: bool
               ) -> list[_Rating]:
        """Each rater's latest verdict per answer since `since` (of `task`, or all tasks), oldest first. Reads only
        the parts written since then, and only the columns it needs."""
        manifest = manifest or self.manifest()
        latest: dict[tuple[str, str], _Rating] = {}
        retracted = self.reviews.retracted()
        read: dict[tuple[str, int, str], list[_RatedRow]] = {}
        for part in manifest.files:
            if part.created_at < since:
                continue
            for row in self._part_ratings(part, read):
                counted = row.at >= since and task in (None, row.task) and (anonymous or row.authenticated)
                if not counted or row.event_id in retracted:
                    continue
                key = (row.request_id, row.rater or row.event_id)
                if key not in latest or latest[key].at <= row.at:
                    # an anonymous rating names no person (an address is not one): each stands alone
                    latest[key] = _Rating(row.at, row.task, row.version, row.value,
                                          row.rater if row.authenticated else None)
        self._rated_rows = read  # parts that left the window are forgotten
        return list(latest.values())

    def _part_ratings(self, part: PartFile, read: dict[tuple[str, int, str], list[_RatedRow]]) -> list[_RatedRow]:
        key = (part.path, part.rows, self.fs.ukey(self.path(part.path)))
        rows = self._rated_rows.get(key)
        if rows is None:
            rows = []
            for row in self.read_part(part.path, columns=RATED_COLUMNS).to_pylist():
                value = row["rating"] if row["rating"] is not None else THUMB_RATING.get(row["thumb"] or "")
                if value is not None:
                    rows.append(_RatedRow(row["feedback_ts"], row["task"], row["adapter_version"], float(value),
                                          row["rater"], bool(row["authenticated"]), row["event_id"],
                                          row["request_id"]))
        read[key] = rows
        return rows

    def export_jsonl(self, path: Path, manifest: Manifest | None = None, until: Mapping[str, int] | None = None
                     ) -> int:
        """Write the rows as JSON lines (atomically); returns how many."""
        rows = self.examples(manifest, until)
        lines = "".join(json.dumps(row.model_dump(mode="json"), ensure_ascii=False) + "\n" for row in rows)
        write_new(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"), replace=True)
        return len(rows)
