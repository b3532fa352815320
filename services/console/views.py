"""What the console shows and does, without HTTP: the same registry, run records and dataset the CLI reads, through
the same functions (registry moves, the canary's review and apply, the run store, the review queue, lineage).

Every method blocks on storage; the routes call them in a worker thread.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from feedback.curator import FeedbackStatus, feedback_status
from feedback.dataset import DailyRatings, DayRating, canary_ratings, curated_dataset
from feedback.oversight import Lineage, PendingCorrection, Retraction, judge, lineage, retract, review_queue
from flywheel.canary import CanaryReview, decide_by_hand, review
from flywheel.config import Settings
from flywheel.registry import (
    CANARY_ALIAS,
    AdapterManifest,
    HistoryEntry,
    Registry,
    UnknownTaskError,
    known_tasks,
    registry_for,
)
from flywheel.runs import RunRecord, RunState, RunStore
from flywheel.tasks import TaskSpec

log = logging.getLogger("flywheel.console")
RECENT_RUNS = 200  # run records the console reads for "last run" and a task's runs
OVERVIEW_DAYS = 14  # the champion's ratings per day on the tasks overview: recent parts only, all tasks in one read
LIVE_LOG_BYTES = 64 * 1024  # of a running run's log, read for its latest losses
PROGRESS_LINE = re.compile(  # the training plane's progress lines (training/sft.py), bounded: linear on any log
    r"event=train_progress method=\w{1,9} step=(\d{1,9})/\d{1,9} (loss|eval_loss)=(\d{1,9}\.\d{1,9})")
PLOT_DAYS = 90  # a task's plot of mean rating per version: bounded however long the history


class TaskRow(BaseModel):
    """One line of the tasks overview."""

    name: str
    kind: str
    champion: str | None
    canary: str | None = Field(None, description="The version on trial, while its share is above 0.")
    canary_share: float | None = None
    review: CanaryReview | None = Field(None, description="The canary test as it stands (arms, interval, verdict).")
    last_run: RunRecord | None = None
    pending_reviews: int = 0
    versions: int = 0
    champion_ratings: list[DayRating] = Field(
        default_factory=list, description=f"The champion's mean rating per day, the last {OVERVIEW_DAYS} days.")


class TimelineEvent(BaseModel):
    """One step in a task's life: a version trained and gated, an alias moved, a retrain started."""

    at: datetime
    kind: Literal["trained", "promoted", "rolled back", "canary", "canary ended", "retrain"]
    version: str | None = None
    text: str
    actor: str | None = None


class TaskPage(BaseModel):
    row: TaskRow
    spec: TaskSpec | None
    versions: list[AdapterManifest]
    aliases: dict[str, list[str]] = Field(description="Version -> the aliases naming it.")
    timeline: list[TimelineEvent] = Field(description="Newest first.")
    runs: list[RunRecord]
    can_roll_back: bool
    ratings: DailyRatings = Field(default_factory=dict, description="Mean rating per version per day.")


class LossPoint(BaseModel):
    step: int
    train_loss: float | None = None
    eval_loss: float | None = None


class TrainingCurve(BaseModel):
    """What a training outcome says (a run's metrics, a version's training record, as the training plane writes
    them): loss at each evaluation and why training stopped."""

    loss_curve: list[LossPoint] = Field(default_factory=list)
    stop_reason: str | None = None

    def latest(self, loss: Literal["train_loss", "eval_loss"]) -> LossPoint | None:
        """The newest point that has this loss (eval runs every so many steps, not at each)."""
        return next((p for p in reversed(self.loss_curve) if getattr(p, loss) is not None), None)


class LoopPage(BaseModel):
    """The loop's moving parts: retrains (running and recent) and the feedback plane."""

    runs: list[RunRecord] = Field(description="Newest first.")
    curves: dict[str, TrainingCurve] = Field(default_factory=dict, description="Run id -> its training curve, for "
                                             "the runs whose report has one.")
    feedback: FeedbackStatus | None
    feedback_error: str | None = None


def _verdict(manifest: AdapterManifest) -> str:
    gate = manifest.gate or {}
    return str(gate.get("verdict") or manifest.status)


class Console:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runs = RunStore.for_settings(settings)
        self.dataset = curated_dataset(settings)  # one reader: it remembers parts read
        self.canary_ratings = canary_ratings(settings, self.dataset)
        # the queue reads and assesses every curated row: computed again only when rows or judgements change
        self._queue: tuple[tuple[object, ...], list[PendingCorrection]] | None = None

    # -- reading -------------------------------------------------------------------------------------

    def _registry(self, task: str) -> Registry:
        if task not in known_tasks(self.settings):
            raise UnknownTaskError(f"unknown task {task!r}")
        return registry_for(self.settings, task)

    def _review(self, registry: Registry) -> CanaryReview | None:
        """The canary's review as the CLI computes it (the replicas' guardrail figures are left out here)."""
        return review(registry, self.settings.canary, partial(self.canary_ratings, registry.task), {})

    def _row(self, spec: TaskSpec, registry: Registry, runs: list[RunRecord], pending: int, ratings: DailyRatings
             ) -> TaskRow:
        aliases = registry.aliases()
        canary = aliases.get(CANARY_ALIAS)
        on_trial = canary is not None and bool(canary.traffic_fraction)
        task_runs = [r for r in runs if (r.task or self.settings.default_task) == spec.name]
        champion = aliases["champion"].version if "champion" in aliases else None
        since = _days_ago(OVERVIEW_DAYS).date()
        return TaskRow(
            name=spec.name, kind=spec.kind, champion=champion,
            champion_ratings=[d for d in ratings.get(champion or "", []) if d.day >= since],
            canary=canary.version if canary and on_trial else None,
            canary_share=canary.traffic_fraction if canary and on_trial else None,
            review=self._review(registry) if on_trial else None,
            last_run=task_runs[-1] if task_runs else None, pending_reviews=pending,
            versions=len(registry.versions()))

    def _pending(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.review_queue():
            counts[item.task] = counts.get(item.task, 0) + 1
        return counts

    def tasks(self) -> list[TaskRow]:
        """Every task: champion and its ratings per day, canary and its test, last run, pending reviews."""
        runs = self.runs.list(RECENT_RUNS)
        pending = self._pending()
        ratings = self.dataset.daily_ratings(_days_ago(OVERVIEW_DAYS))
        return [self._row(spec, registry_for(self.settings, name), runs, pending.get(name, 0), ratings.get(name, {}))
                for name, spec in sorted(known_tasks(self.settings).items())]

    def task(self, name: str) -> TaskPage:
        """A task's versions, history as a timeline, canary and runs."""
        registry = self._registry(name)
        spec = known_tasks(self.settings)[name]
        runs = [r for r in self.runs.list(RECENT_RUNS) if (r.task or self.settings.default_task) == name]
        versions = registry.versions()
        history = registry.history()
        named: dict[str, list[str]] = {}
        for alias, record in registry.aliases().items():
            if alias != CANARY_ALIAS or record.traffic_fraction:
                named.setdefault(record.version, []).append(alias)
        timeline = [TimelineEvent(at=m.created_at, kind="trained", version=m.version,
                                  text=f"{m.version} trained from {m.parent or 'the base'}; gate: {_verdict(m)}")
                    for m in versions]
        timeline += [_history_event(e) for e in history]
        timeline += [TimelineEvent(at=r.started_at, kind="retrain", version=r.version, actor=r.trigger,
                                   text=f"retrain {r.run_id} ({r.trigger}): {r.state.value}"
                                        + (f" — {r.message}" if r.message else "")) for r in runs]
        timeline.sort(key=lambda e: e.at, reverse=True)
        promotions = [e for e in history if e.alias == "champion" and e.action == "promote"]
        ratings = self.dataset.daily_ratings(_days_ago(PLOT_DAYS), name).get(name, {})
        row = self._row(spec, registry, runs, self._pending().get(name, 0), ratings)
        return TaskPage(row=row, spec=spec, versions=versions, aliases={v: sorted(a) for v, a in named.items()},
                        timeline=timeline, runs=list(reversed(runs)), can_roll_back=len(promotions) >= 2,
                        ratings=ratings)

    def loop(self) -> LoopPage:
        """Retrains, newest first, and what the curator has taken in (as `flywheel feedback status`)."""
        runs = list(reversed(self.runs.list(50)))
        curves = {r.run_id: curve for r in runs if (curve := _training_curve(r.metrics, r.run_id)
                                                    or self._live_curve(r)) is not None}
        try:
            return LoopPage(runs=runs, curves=curves, feedback=feedback_status(self.settings))
        except OSError as exc:  # the curator's state cannot be read here: say so, show the runs
            log.warning("event=console_feedback_status_unreadable error=%r", exc)
            return LoopPage(runs=runs, curves=curves, feedback=None,
                            feedback_error=f"the feedback plane cannot be read here ({exc})")

    def _live_curve(self, record: RunRecord) -> TrainingCurve | None:
        """A running run's losses so far, from the progress lines its training writes to the run's log (the last
        LIVE_LOG_BYTES of it: the newest points)."""
        if record.state != RunState.RUNNING:
            return None
        tail = self.runs.read_log(record.run_id, LIVE_LOG_BYTES)
        if tail is None:  # no log anywhere (a run started with --wait)
            return None
        points: dict[int, LossPoint] = {}
        for step, key, value in PROGRESS_LINE.findall(tail):
            point = points.setdefault(int(step), LossPoint(step=int(step)))
            setattr(point, "train_loss" if key == "loss" else "eval_loss", float(value))
        return TrainingCurve(loss_curve=sorted(points.values(), key=lambda p: p.step)) if points else None

    def version(self, task: str, version: str) -> tuple[AdapterManifest, TrainingCurve | None]:
        """A version's manifest (its gate report, metrics, data and training config) and its training's loss curve."""
        manifest = self._registry(task).manifest(version)
        return manifest, _training_curve(manifest.training, version)

    def review_queue(self, task: str | None = None) -> list[PendingCorrection]:
        """Pending corrections (of `task`, or every task's)."""
        stamp = (tuple((part.path, part.rows) for part in self.dataset.manifest().files),
                 tuple(self.dataset.reviews.files()), tuple(sorted(known_tasks(self.settings))))
        cached = self._queue
        if cached is None or cached[0] != stamp:
            cached = self._queue = (stamp, review_queue(self.settings))
        return [item for item in cached[1] if task is None or item.task == task]

    def lineage(self, identifier: str) -> Lineage:
        return lineage(self.settings, identifier)

    # -- acting: each move is recorded with who pressed the button -----------------------------------

    def promote(self, task: str, version: str, who: str, expected_champion: str | None, reason: str = ""
                ) -> HistoryEntry:
        """Make `version` champion, refused (ChampionChangedError) unless the champion is still
        `expected_champion`, the one the page showed (None: it showed none)."""
        return self._registry(task).promote(version, actor=who, reason=reason or "promoted in the console",
                                            expected_champion=expected_champion)

    def rollback(self, task: str, who: str, expected_champion: str | None, reason: str = "") -> HistoryEntry:
        """Roll the champion back, refused unless it is still `expected_champion`, the one the page showed."""
        return self._registry(task).rollback(actor=who, reason=reason or "rolled back in the console",
                                             expected_champion=expected_champion)

    def canary(self, task: str, verdict: Literal["promote", "rollback"], who: str) -> CanaryReview:
        """Promote or abort the task's canary now, whatever its ratings say (as `flywheel canary promote|abort`)."""
        return decide_by_hand(self._registry(task), self.settings.canary,
                              partial(self.canary_ratings, task), verdict, actor=who, via="console")

    def retrain(self, task: str, who: str) -> RunRecord:
        """Start a retrain in the background (RetrainBusyError if one runs); the run record names who asked."""
        self._registry(task)
        return self.runs.launch_retrain(self.settings, f"console:{who}", task)

    def judge(self, approve: list[str], reject: list[str], who: str, reason: str = "") -> dict[str, Any]:
        approved, unknown_a = judge(self.settings, approve, "approve", who, reason)
        rejected, unknown_r = judge(self.settings, reject, "reject", who, reason)
        return {"approved": approved, "rejected": rejected, "unknown": unknown_a + unknown_r}

    def retract(self, event_ids: list[str], who: str, reason: str) -> Retraction:
        return retract(self.settings, event_ids, by=who, reason=reason)


def _training_curve(training: dict[str, Any] | None, owner: str) -> TrainingCurve | None:
    """The loss curve and stop reason of a training outcome (a run's metrics, a version's training record); None
    when it has neither (older runs, or not trained yet) or when they are not in the shape the console reads (said
    in the log, the rest of the page still shown)."""
    training = training or {}
    if not training.get("loss_curve") and not training.get("stop_reason"):
        return None
    try:
        return TrainingCurve.model_validate(training)
    except ValidationError as exc:
        log.warning("event=console_loss_curve_unreadable of=%s error=%r", owner, str(exc))
        return None


def _days_ago(days: int) -> datetime:
    """The start of the day `days - 1` days before today (UTC): `days` whole days, today included."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days - 1)


def _history_event(entry: HistoryEntry) -> TimelineEvent:
    if entry.alias == CANARY_ALIAS:
        kind: Literal["promoted", "rolled back", "canary", "canary ended"] = (
            "canary ended" if entry.action == "end" or not entry.traffic_fraction else "canary")
        share = f" at {entry.traffic_fraction:.0%}" if entry.traffic_fraction else ""
        text = f"canary {entry.version}{share}"
    else:
        kind = "rolled back" if entry.action == "rollback" else "promoted"
        text = f"{entry.alias}: {entry.previous or '-'} → {entry.version}"
    return TimelineEvent(at=entry.at, kind=kind, version=entry.version, actor=entry.actor,
                         text=f"{text}" + (f" — {entry.reason}" if entry.reason else ""))
