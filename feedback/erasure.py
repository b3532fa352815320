"""`flywheel users forget USER`: a data-protection erasure of one user's predictions and feedback.

A user is a rater or asker identity (a key's name, `key/end-user`), or an end user's id as an app backend
forwarded it (matched raw and as its pseudonym). What goes, everywhere flywheel stores it:

- curated Parquet parts: rewritten without their rows (each atomically; the curator's state, or for
  partitioned output an erasure record beside the commits, and the manifest follow);
- the curator's join state: their waiting predictions and feedback;
- the local log and the spool: their records are overwritten in place with NUL bytes, which every reader
  skips, so the byte positions the curator keeps stay valid;
- the review log's judgements of their rows, and the training rows that versions recorded from them
  (`train_data.jsonl`: the weights stay, and the report names the versions that learned from them).

Kafka itself keeps records until its retention deletes them: set the topics' `retention.ms` to what your
erasure deadline allows (README).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from feedback.curator import state_path
from feedback.dataset import PartFile, curated_dataset, task_counts
from feedback.local_log import READ_CHUNK
from feedback.partitioned import partitioned_dataset
from feedback.pii import pseudonym
from flywheel.config import Settings
from flywheel.registry import known_tasks, registry_for


class Erasure(BaseModel):
    """What `forget` removed, and which versions had learned from the user's rows."""

    user: str
    curated_rows: int = 0
    parts_rewritten: int = 0
    joined_predictions: int = 0
    waiting_feedback: int = 0
    log_records: int = 0
    spool_records: int = 0
    judgements: int = 0
    training_rows: int = 0
    trained: dict[str, list[str]] = Field(default_factory=dict, description="Task -> versions that trained on "
                                          "their rows (the weights keep what they learned: retrain or retract).")


class _Matcher:
    def __init__(self, user: str) -> None:
        self.names = {user, pseudonym(user) or user}

    def identity(self, value: object) -> bool:
        """An identity field (rater, asker, user_id) that is the user or one of their end-user forms."""
        return isinstance(value, str) and (value in self.names or any(value.endswith(f"/{n}") for n in self.names))

    def event(self, event: dict, request_ids: set[str]) -> bool:
        return (any(self.identity(event.get(f)) for f in ("asker", "rater", "user_id"))
                or event.get("request_id") in request_ids)


def forget(settings: Settings, user: str) -> Erasure:
    match = _Matcher(user)
    report = Erasure(user=user)
    event_ids, request_ids = _curated(settings, match, report)
    _join_state(settings, match, request_ids, report)
    report.log_records = _blank_records(sorted((settings.feedback_dir / "log").glob("*.log")), match, request_ids)
    report.spool_records = _blank_records(sorted((settings.feedback_dir / "spool").glob("*.log")), match,
                                          request_ids)
    report.judgements = curated_dataset(settings).reviews.rewrite_without(event_ids)
    for task in known_tasks(settings):
        registry = registry_for(settings, task)
        for manifest in registry.versions():
            removed = registry.redact_train_data(manifest.version, lambda row: not (
                event_ids.intersection(row.get("event_ids", ())) or any(map(match.identity, row.get("raters", ())))))
            if removed:
                report.training_rows += removed
                report.trained.setdefault(task, []).append(manifest.version)
    return report


def _curated(settings: Settings, match: _Matcher, report: Erasure) -> tuple[set[str], set[str]]:
    """Rewrite the parts holding the user's rows; (their event ids, their request ids)."""
    dataset = curated_dataset(settings)
    partitioned = partitioned_dataset(settings) if settings.feedback.curation == "partitioned" else None
    parts = (partitioned or dataset).manifest().files  # the commits themselves, published or not
    tables = {part.path: dataset.read_part(part.path) for part in parts}
    request_ids: set[str] = set()
    for table in tables.values():
        for column in ("rater", "asker", "user_id"):
            values = table[column].to_pylist()
            request_ids |= {r for r, v in zip(table["request_id"].to_pylist(), values, strict=True)
                            if match.identity(v)}
    event_ids: set[str] = set()
    rewritten: list[PartFile] = []
    for part in parts:
        table = tables[part.path]
        theirs = pc.is_in(table["request_id"], value_set=pa.array(sorted(request_ids), type=pa.string()))
        if not pc.any(theirs).as_py():
            continue
        event_ids |= set(table.filter(theirs)["event_id"].to_pylist())
        kept = table.filter(pc.invert(theirs))
        dataset.write_table(part.path, kept)
        report.curated_rows += table.num_rows - kept.num_rows
        rewritten.append(part.model_copy(update={"rows": kept.num_rows,
                                                 "tasks": task_counts(kept["task"].to_pylist())}))
    report.parts_rewritten = len(rewritten)
    if rewritten and partitioned is not None:
        partitioned.record_erasure(rewritten)
        partitioned.publish_manifest()
        return event_ids, request_ids
    if rewritten and state_path(settings).is_file():
        with sqlite3.connect(state_path(settings), timeout=30) as db:  # the curator rewrites the manifest from it
            db.execute("PRAGMA secure_delete = ON")
            db.executemany("UPDATE parts SET entry = ? WHERE path = ?",
                           [(p.model_dump_json(), p.path) for p in rewritten])
    if rewritten:
        manifest = dataset.manifest()
        entries = {p.path: p for p in rewritten}
        dataset.write_manifest(manifest.model_copy(update={"files": [entries.get(f.path, f) for f in manifest.files]}))
    return event_ids, request_ids


def _join_state(settings: Settings, match: _Matcher, request_ids: set[str], report: Erasure) -> None:
    path = state_path(settings)
    if not path.is_file():
        return
    with sqlite3.connect(path, timeout=30) as db:
        db.execute("PRAGMA secure_delete = ON")  # deleted rows are zeroed, not left in free pages
        for table, fields, counter in (("predictions", ("asker",), "joined_predictions"),
                                       ("unmatched", ("rater", "user_id"), "waiting_feedback")):
            rows = db.execute(f"SELECT request_id, event FROM {table}").fetchall()
            doomed = [rid for rid, event in rows if rid in request_ids
                      or any(match.identity(json.loads(event).get(f)) for f in fields)]
            db.executemany(f"DELETE FROM {table} WHERE request_id = ?", [(r,) for r in doomed])
            setattr(report, counter, len(doomed))
            request_ids.update(doomed)
    with sqlite3.connect(path, timeout=30) as db:  # and the write-ahead log gives the old pages up
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _blank_records(paths: list[Path], match: _Matcher, request_ids: set[str]) -> int:
    """Overwrite the user's records with NUL bytes (same length: positions stay valid; readers skip them)."""
    blanked = 0
    for path in paths:
        fd = os.open(path, os.O_RDWR)
        try:
            position = 0
            while chunk := os.pread(fd, READ_CHUNK, position):
                end = chunk.rfind(b"\n")
                if end < 0:
                    break
                for line in chunk[:end].split(b"\n"):
                    if line and not line.startswith(b"\0") and _theirs(line, match, request_ids):
                        os.pwrite(fd, b"\0" * len(line), position)
                        blanked += 1
                    position += len(line) + 1
            os.fsync(fd)
        finally:
            os.close(fd)
    return blanked


def _theirs(line: bytes, match: _Matcher, request_ids: set[str]) -> bool:
    try:
        event = json.loads(line)
    except ValueError:
        return False
    return isinstance(event, dict) and match.event(event, request_ids)
