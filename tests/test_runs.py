"""Retrain run records: bounded history, and a running run is never forgotten."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from flywheel.runs import RunRecord, RunState, RunStore


def test_old_finished_runs_are_forgotten_and_running_ones_kept(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs", keep=3)
    running = RunRecord(run_id="run-20260101-000000-aaaaaa", trigger="admin")
    store.save(running)
    finished = []
    for i in range(6):
        record = RunRecord(run_id=f"run-20260101-0000{i + 1:02d}-bbbbbb", trigger="schedule",
                           state=RunState.PASSED, finished_at=datetime.now(UTC))
        (store.root / f"{record.run_id}.log").write_text("training …\n")
        store.save(record)
        finished.append(record.run_id)
    assert [r.run_id for r in store.list()] == [running.run_id, *finished[-3:]]
    assert sorted(p.name for p in store.root.glob("*.log")) == [f"{r}.log" for r in finished[-3:]]
