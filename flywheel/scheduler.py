"""The retrain schedule inside `flywheel up`: a task's run starts when enough time AND enough new data exist,
and no canary of the task is still on trial. New data is the task's curated rows committed after the snapshot
of its last run, whatever that run kept of them (`retrain.max_feedback_rows` caps what a run reads, not this).

Each task is watched on its own (its own runs, its own curated rows); runs still go one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from feedback.dataset import curated_dataset
from flywheel.config import Settings
from flywheel.registry import known_tasks, registry_for
from flywheel.runs import RetrainBusyError, RunStore

log = logging.getLogger("flywheel.scheduler")


class RetrainScheduler(threading.Thread):
    """Starts a retrain whenever one is due; `may_start` (checked just before each launch) can veto it."""

    def __init__(self, settings: Settings, stop: threading.Event, check_every_s: float = 5.0,
                 may_start: Callable[[], bool] = lambda: True, fence: int | None = None) -> None:
        super().__init__(name="retrain-scheduler", daemon=True)
        self.settings = settings
        self.stop = stop
        self.fence = fence  # the loop lease's epoch: the runs it starts move aliases under it
        self.check_every_s = check_every_s
        self.may_start = may_start
        self.store = RunStore.for_settings(settings)
        self.dataset = curated_dataset(settings)
        self.started = time.time()

    def due(self, task: str | None = None) -> tuple[bool, str]:
        """(start a run of `task` now?, why or why not)."""
        cfg = self.settings.retrain
        task = task or self.settings.default_task
        runs = [r for r in self.store.list() if (r.task or self.settings.default_task) == task]
        last_start = runs[-1].started_at.timestamp() if runs else self.started
        waited = time.time() - last_start
        # New data: the task's rows curated after the last run's snapshot (by dataset positions), counted from
        # the manifest's per-part tallies, so a look reads one file however many parts the dataset has.
        snapshots = [r.dataset["snapshot_positions"] for r in runs if "snapshot_positions" in r.dataset]
        new_rows = self.dataset.rows_by_task(after=snapshots[-1] if snapshots else None).get(task, 0)
        canary = registry_for(self.settings, task).canary_on_trial()
        if canary is not None:
            return False, f"canary {canary.version} is on trial; one candidate at a time"
        if waited < cfg.schedule_interval_s:
            return False, f"{waited:.0f}s since the last run; interval {cfg.schedule_interval_s:.0f}s"
        if new_rows < cfg.schedule_min_new_examples:
            return False, f"{new_rows} new curated rows; need {cfg.schedule_min_new_examples}"
        return True, f"{new_rows} new curated rows after {waited:.0f}s"

    def run(self) -> None:
        log.info("event=scheduler_started interval_s=%s min_new=%s", self.settings.retrain.schedule_interval_s,
                 self.settings.retrain.schedule_min_new_examples)
        while not self.stop.wait(self.check_every_s):
            try:
                for task in known_tasks(self.settings):
                    if registry_for(self.settings, task).alias("champion") is None:
                        continue  # nothing to start from: `flywheel train` gives a task its first adapter
                    go, why = self.due(task)
                    if go and self.may_start():
                        record = self.store.launch_retrain(self.settings, "schedule", task, fence=self.fence)
                        log.info("event=retrain_triggered run_id=%s task=%s by=schedule why=%r", record.run_id,
                                 task, why)
                        break  # one run at a time
            except RetrainBusyError:
                continue
            except Exception:  # the scheduler must outlive a bad check
                log.exception("event=scheduler_check_failed")
