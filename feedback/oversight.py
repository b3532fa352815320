"""People over the loop: the review queue, retractions, and lineage (which feedback made which version).

Shared by `flywheel feedback review|retract`, `flywheel lineage` and the admin routes, so the CLI and
HTTP answer alike. Lineage needs no index of its own: a version's `train_data.jsonl` names the curated
events each training row came from (replayed rows keep theirs), its manifest names its parent and the
dataset positions it read, and the task's history says when it served.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from feedback.curator import state_path
from feedback.dataset import SCHEMA, CuratedDataset, curated_dataset, current_verdicts
from feedback.review import Judgement
from feedback.schemas import CuratedExample
from feedback.trust import Assessed, Trust, assess, pending_review
from flywheel.config import Settings
from flywheel.registry import TRAIN_DATA_FILE, Registry, RegistryError, known_tasks, registry_for


class PendingCorrection(BaseModel):
    """One correction waiting for an admin."""

    event_id: str
    task: str
    prompt: str
    served_answer: str
    proposed_answer: str
    proposed_by: str | None
    trust: Trust
    raters_agreeing: int
    why: str
    at: datetime


def assessed_rows(settings: Settings, task: str | None = None) -> list[Assessed]:
    """The current verdicts of `task` (default: every task), each task's assessed on its own."""
    dataset = curated_dataset(settings)
    decisions = dataset.reviews.decisions()
    by_task: dict[str, list[CuratedExample]] = {}
    for row in dataset.examples(task=task):
        by_task.setdefault(row.task, []).append(row)
    return [item for name, rows in by_task.items() for item in _assess(settings, name, rows, decisions)]


def _assess(settings: Settings, task: str, rows: list[CuratedExample], decisions: dict[str, Judgement]
            ) -> list[Assessed]:
    spec = known_tasks(settings).get(task)
    return assess(rows, decisions, confirm_raters=settings.retrain.confirm_raters, majority=settings.retrain.majority,
                  labelled=spec is not None and spec.kind == "classification")


def review_queue(settings: Settings, task: str | None = None) -> list[PendingCorrection]:
    """Corrections a retrain will not learn until an admin approves them: anonymous, conflicting, screened out,
    or below `retrain.min_trust`."""
    pending = pending_review(assessed_rows(settings, task), min_trust=settings.retrain.min_trust)
    return [PendingCorrection(
        event_id=i.row.event_id, task=i.row.task, prompt=i.row.prompt, served_answer=i.row.answer,
        proposed_answer=i.row.correction or "", proposed_by=i.row.rater, trust=i.trust, raters_agreeing=i.raters,
        why=i.held or f"trust {i.trust} is below retrain.min_trust {settings.retrain.min_trust}",
        at=i.row.feedback_ts) for i in pending]


def judge(settings: Settings, event_ids: Iterable[str], action: Literal["approve", "reject", "retract"], by: str,
          reason: str = "") -> tuple[list[str], list[str]]:
    """Record `action` on each event; returns (judged, unknown ids). Approving makes a row `reviewed`."""
    dataset = curated_dataset(settings)
    wanted = list(dict.fromkeys(event_ids))
    known = _existing_events(dataset, set(wanted))
    judged = [e for e in wanted if e in known]
    dataset.reviews.append(Judgement(event_id=e, action=action, by=by, reason=reason) for e in judged)
    return judged, [e for e in wanted if e not in known]


def _existing_events(dataset: CuratedDataset, event_ids: set[str]) -> set[str]:
    found: set[str] = set()
    for part in dataset.manifest().files:
        column = dataset.read_part(part.path, columns=["event_id"])["event_id"]
        found |= set(pc.filter(column, pc.is_in(column, value_set=_strings(event_ids))).to_pylist())
    return found


def _strings(values: Iterable[str]) -> pa.Array:
    return pa.array(sorted(values), type=pa.string())


def author_of(settings: Settings, event_id: str) -> str | None:
    """The rater of a curated event (None: no such event, or one from before identities)."""
    rows = _rows_where(curated_dataset(settings), "event_id", event_id)
    return rows[0]["rater"] if rows else None


def events_matching(settings: Settings, *, rater: str | None = None, request_id: str | None = None) -> list[str]:
    """Event ids of every curated row by `rater`, or about `request_id`."""
    dataset = curated_dataset(settings)
    ids: list[str] = []
    for part in dataset.manifest().files:
        table = dataset.read_part(part.path, columns=["event_id", "request_id", "rater"])
        if rater is not None:
            table = table.filter(pc.equal(table["rater"], rater))
        if request_id is not None:
            table = table.filter(pc.equal(table["request_id"], request_id))
        ids += table["event_id"].to_pylist()
    return ids


# -- lineage ------------------------------------------------------------------------------------

class VersionLineage(BaseModel):
    version: str
    task: str
    status: str
    parents: list[str] = Field(description="Its parent, its parent's parent, … (oldest last).")
    data: dict[str, Any] = Field(default_factory=dict, description="What its retrain read: dataset positions, "
                                 "rows by source and trust.")
    rows_by_source: dict[str, int] = Field(default_factory=dict)
    gate: dict[str, Any] | None = None
    champion_periods: list[dict[str, Any]] = Field(default_factory=list, description="When it became champion, and "
                                                   "what replaced it.")


class EventLineage(BaseModel):
    event_id: str
    row: CuratedExample | None
    trust: Trust | None
    retracted: bool
    judgements: list[Judgement]
    trained: list[str] = Field(description="Versions whose training rows include it (directly or through replay).")


class RequestLineage(BaseModel):
    request_id: str
    answered_by: str | None
    ancestors: list[str]
    feedback: list[EventLineage]


class Lineage(BaseModel):
    kind: Literal["version", "event", "request"]
    version: VersionLineage | None = None
    event: EventLineage | None = None
    request: RequestLineage | None = None


def trained_on(registry: Registry, version: str) -> set[str]:
    """The curated events version `version` trained on (from its training rows)."""
    path = registry.local_path(version) / TRAIN_DATA_FILE
    if not path.is_file():
        return set()
    ids: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if '"event_ids":[]' not in line and line.strip():
            ids.update(json.loads(line).get("event_ids", ()))
    return ids


FEW_EVENTS = 100  # up to this many, look each event up as text; past it, parse every training row


def trained_on_any(registry: Registry, version: str, event_ids: set[str]) -> bool:
    """Whether version `version` trained on any of `event_ids`. A few ids are found as quoted text first (a JSON
    string inside another string has its quotes escaped), and only the lines holding them are parsed."""
    if len(event_ids) > FEW_EVENTS:
        return bool(event_ids & trained_on(registry, version))
    path = registry.local_path(version) / TRAIN_DATA_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for event_id in event_ids:
        found = text.find(f'"{event_id}"')
        while found >= 0:
            start, end = text.rfind("\n", 0, found) + 1, text.find("\n", found)
            end = len(text) if end < 0 else end
            if event_id in json.loads(text[start:end]).get("event_ids", ()):
                return True
            found = text.find(f'"{event_id}"', end)
    return False


def versions_trained_on(settings: Settings, event_ids: set[str], tasks: Iterable[str] | None = None
                        ) -> dict[str, list[str]]:
    """Task -> its versions whose training rows include any of `event_ids`."""
    out: dict[str, list[str]] = {}
    for task in tasks or known_tasks(settings):
        registry = registry_for(settings, task)
        hit = [m.version for m in registry.versions() if trained_on_any(registry, m.version, event_ids)]
        if hit:
            out[task] = hit
    return out


def _version_lineage(settings: Settings, version: str) -> VersionLineage:
    task = version.rsplit("-v", 1)[0]
    registry = registry_for(settings, task)
    manifest = registry.manifest(version)
    parents, parent = [], manifest.parent
    while parent:
        parents.append(parent)
        parent = registry.manifest(parent).parent
    sources: dict[str, int] = {}
    path = registry.local_path(version) / TRAIN_DATA_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                source = json.loads(line).get("source", "?")
                sources[source] = sources.get(source, 0) + 1
    periods = [{"at": e.at, "by": e.actor, "previous": e.previous, "reason": e.reason}
               for e in registry.history("champion") if e.version == version]
    return VersionLineage(version=version, task=task, status=manifest.status, parents=parents,
                          data=manifest.data or {}, rows_by_source=sources, gate=manifest.gate,
                          champion_periods=periods)


def _event_lineage(settings: Settings, event_id: str) -> EventLineage:
    dataset = curated_dataset(settings)
    table = _rows_where(dataset, "event_id", event_id)
    row = CuratedExample.model_validate(table[0]) if table else None
    judgements = [j for j in dataset.reviews.judgements() if j.event_id == event_id]
    retracted = any(j.action == "retract" for j in judgements)
    trust = None
    if row is not None and not retracted:  # trust is decided among the verdicts on the same prompt
        decisions = dataset.reviews.decisions()
        peers = current_verdicts(CuratedExample.model_validate(r) for r in _rows_where(dataset, "prompt", row.prompt)
                                 if r["task"] == row.task)
        trust = next((i.trust for i in _assess(settings, row.task, peers, decisions) if i.row.event_id == event_id),
                     None)
    tasks = [row.task] if row else None
    trained = [v for versions in versions_trained_on(settings, {event_id}, tasks).values() for v in versions]
    return EventLineage(event_id=event_id, row=row, trust=trust, retracted=retracted, judgements=judgements,
                        trained=trained)


def _rows_where(dataset: CuratedDataset, column: str, value: str) -> list[dict[str, Any]]:
    """Curated rows whose `column` is `value`: the parts scanned as one dataset, in parallel."""
    paths = [dataset.path(part.path) for part in dataset.manifest().files]
    if not paths:
        return []
    match = ds.field(column) == value
    # first only the one column, to learn which parts hold a match; then those parts' whole rows
    scanner = ds.dataset(paths, schema=SCHEMA, format="parquet", filesystem=dataset.arrow_fs).scanner(
        columns=[column], filter=match)
    holding = sorted({tagged.fragment.path for tagged in scanner.scan_batches() if tagged.record_batch.num_rows})
    return [row for path in holding for row in pq.read_table(path, schema=SCHEMA, filters=match,
                                                              filesystem=dataset.arrow_fs).to_pylist()]


def _waiting_prediction(settings: Settings, request_id: str) -> str | None:
    """The version that answered a request nobody rated (yet): the curator keeps it for joining, read-only here."""
    path = state_path(settings)
    if not path.is_file():
        return None
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        row = db.execute("SELECT event FROM predictions WHERE request_id = ?", (request_id,)).fetchone()
    return json.loads(row[0])["adapter_version"] if row else None


def lineage(settings: Settings, identifier: str) -> Lineage:
    """A version (`task-vN`), a request id (32 hex) or an event id; LookupError if none is known."""
    if "-v" in identifier and identifier.rsplit("-v", 1)[1].isdigit():
        try:
            return Lineage(kind="version", version=_version_lineage(settings, identifier))
        except (RegistryError, OSError, ValueError) as exc:
            raise LookupError(f"no version {identifier!r}") from exc
    dataset = curated_dataset(settings)
    answered = _rows_where(dataset, "request_id", identifier)
    version = answered[0]["adapter_version"] if answered else _waiting_prediction(settings, identifier)
    if version is not None:
        try:
            ancestors = _version_lineage(settings, version).parents
        except (RegistryError, OSError, ValueError):
            ancestors = []
        feedback = [_event_lineage(settings, row["event_id"]) for row in answered]
        return Lineage(kind="request", request=RequestLineage(request_id=identifier, answered_by=version,
                                                              ancestors=ancestors, feedback=feedback))
    event = _event_lineage(settings, identifier)
    if event.row is None and not event.judgements:
        raise LookupError(f"no version, curated request or feedback event {identifier!r}")
    return Lineage(kind="event", event=event)


class Retraction(BaseModel):
    """What `flywheel feedback retract` did."""

    retracted: list[str]
    unknown: list[str]
    trained: dict[str, list[str]] = Field(description="Task -> versions whose training included the retracted rows.")
    rolled_back: dict[str, str] = Field(default_factory=dict, description="Task -> the clean ancestor now champion.")
    canaries_ended: list[str] = Field(default_factory=list)


def retract(settings: Settings, event_ids: Iterable[str], *, by: str, reason: str, rollback: bool = False
            ) -> Retraction:
    """Tombstone the events (never trained on again, replay included) and name the versions that learned them;
    with `rollback`, each affected task's champion moves to its newest ancestor untouched by them (a canary
    that carries them is ended first)."""
    done, unknown = judge(settings, event_ids, "retract", by, reason)
    gone = set(done)
    trained = versions_trained_on(settings, gone) if gone else {}
    result = Retraction(retracted=done, unknown=unknown, trained=trained)
    if not rollback:
        return result
    for task, versions in trained.items():
        registry = registry_for(settings, task)
        tainted = set(versions)
        canary = registry.alias("canary")
        if canary in tainted and registry.end_canary(actor=by, reason=f"retracted feedback: {reason}"):
            result.canaries_ended.append(canary)
        champion = registry.alias("champion")
        if champion not in tainted:
            continue
        clean = champion
        while clean is not None and clean in tainted:
            clean = registry.manifest(clean).parent
        if clean is None:
            raise LookupError(f"task {task}: every ancestor of {champion} learned the retracted feedback")
        registry.promote(clean, actor=by, reason=f"rolled back from {champion}: retracted feedback ({reason})",
                         expected_champion=champion)
        result.rolled_back[task] = clean
    return result
