"""The retrain schedule: new data is the task's rows curated since its last run's snapshot, counted from the
dataset's manifest."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from feedback import dataset as dataset_module
from feedback.dataset import CuratedDataset, Manifest, PartFile
from feedback.schemas import CuratedExample
from flywheel.config import Settings
from flywheel.runs import RunRecord, RunState, RunStore
from flywheel.scheduler import RetrainScheduler


def rows(task: str, first: int, n: int) -> list[CuratedExample]:
    now = datetime.now(UTC)
    return [CuratedExample(
        event_id=f"e{i}", request_id=f"{i:032x}", task=task, feedback_ts=now, prediction_ts=now,
        adapter_version=f"{task}-v1", prompt_kind="text", prompt=f"q {i}", answer="a", reasoning="", rating=5,
        thumb=None, correction=None, comment=None, user_id=None, tenant_id=None, feedback_source="log/0",
        feedback_offset=i, prediction_source="log/0", prediction_offset=i) for i in range(first, first + n)]


def commit(dataset: CuratedDataset, batch: list[CuratedExample], *, keep_counts: bool = True) -> Manifest:
    """Write `batch` as one part, as the curator commits it (positions: one per row, in order)."""
    manifest = dataset.manifest()
    position = manifest.positions.get("log/0", 0) + len(batch)
    part = PartFile(path=f"day=2026-12-05/part-{len(manifest.files):010d}-000.parquet", day="2026-12-05",
                    batch=len(manifest.files), rows=len(batch), offsets={"log/0": (position - len(batch), position)},
                    positions={"log/0": position}, created_at=datetime.now(UTC),
                    tasks={r.task: sum(x.task == r.task for x in batch) for r in batch} if keep_counts else None)
    dataset.write_part(part.path, batch)
    manifest = manifest.model_copy(update={"positions": {"log/0": position}, "files": [*manifest.files, part]})
    dataset.write_manifest(manifest)
    return manifest


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path / "home", registry={"uri": str(tmp_path / "registry")})
    settings.retrain.max_feedback_rows = 100
    settings.retrain.schedule_min_new_examples = 50
    settings.retrain.schedule_interval_s = 60
    return settings


def test_new_data_is_what_was_curated_after_the_last_runs_snapshot(settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `max_feedback_rows` a run reads only the newest 100 rows; the next run is due when 50 rows arrived
    after its snapshot, not on every tick because the dataset holds more than it read."""
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    commit(dataset, rows("demo", 0, 80), keep_counts=False)  # written before parts kept their counts
    commit(dataset, rows("demo", 80, 80))
    snapshot = commit(dataset, [*rows("demo", 160, 80), *rows("faq", 240, 30)])
    scheduler = RetrainScheduler(settings, threading.Event())
    scheduler.started -= 3600
    assert scheduler.due("demo") == (True, "240 new curated rows after 3600s")  # no run yet: every row is new

    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    RunStore.for_settings(settings).save(RunRecord(
        run_id="run-20261205-040000-aaaaaa", task="demo", trigger="schedule", state=RunState.PASSED,
        started_at=hour_ago, finished_at=hour_ago, dataset={"feedback_rows": 100,
                                                            "snapshot_positions": snapshot.positions}))
    due, why = scheduler.due("demo")
    assert not due and why == "0 new curated rows; need 50", why

    commit(dataset, rows("demo", 270, 30))
    commit(dataset, rows("faq", 300, 40))  # another task's rows are not this task's new data
    assert scheduler.due("demo") == (False, "30 new curated rows; need 50")
    assert scheduler.due("faq")[1].startswith("70 new curated rows")  # faq never ran: all of its rows

    def no_parquet(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a look read a Parquet part")

    scheduler.due("demo")  # the part without counts is read once, then remembered
    monkeypatch.setattr(dataset_module.pq, "read_table", no_parquet)
    commit(dataset, rows("demo", 340, 25))
    due, why = scheduler.due("demo")
    assert due and why.startswith("55 new curated rows"), why
