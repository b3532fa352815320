"""Retrain run records: bounded history, and a running run is never forgotten."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.cli import app as cli
from flywheel.runs import STALE_AFTER_S, RunRecord, RunState, RunStore, job_address


def test_old_finished_runs_are_forgotten_and_running_ones_kept(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs", keep=3)
    running = RunRecord(run_id="run-20260101-000000-aaaaaa", trigger="admin")
    store.save(running)
    finished = []
    for i in range(6):
        record = RunRecord(run_id=f"run-20260101-0000{i + 1:02d}-bbbbbb", trigger="schedule",
                           state=RunState.PASSED, finished_at=datetime.now(UTC))
        (store.local_dir / f"{record.run_id}.log").write_text("training …\n")
        store.save(record)
        finished.append(record.run_id)
    assert [r.run_id for r in store.list()] == [running.run_id, *finished[-3:]]
    assert sorted(p.name for p in store.local_dir.glob("*.log")) == [f"{r}.log" for r in finished[-3:]]


def test_the_summary_counts_verdicts_ever_and_rejections_in_a_row(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs", keep=2)
    scores = {"champion": {"golden": {"score": 0.8}}, "candidate": {"golden": {"score": 0.7}}}
    verdicts = [RunState.PASSED, RunState.REJECTED, RunState.INSUFFICIENT_DATA, RunState.REJECTED]
    for i, state in enumerate(verdicts):
        record = RunRecord(run_id=f"run-20260101-0000{i:02d}-cccccc", trigger="schedule", task="demo", state=state,
                           report={"scores": scores} if state != RunState.INSUFFICIENT_DATA else None)
        store.save(record)  # running
        record.finished_at = datetime.now(UTC)
        store.save(record)  # finished: counted once
        store.save(record)  # saved again: not counted again
    summary = store.summary()
    assert summary["outcomes"] == {("demo", "passed"): 1, ("demo", "rejected"): 2, ("demo", "insufficient_data"): 1}
    assert len(store.list()) == 2  # old records pruned, the counts stay
    assert summary["rejections_in_a_row"] == {"demo": 1}  # only the kept records: the last pass was pruned
    assert summary["gate"] == {("demo", "champion", "golden"): 0.8, ("demo", "candidate", "golden"): 0.7}


@pytest.mark.parametrize(("address", "allowed"), [
    ("http://127.0.0.1:8265", "http://127.0.0.1:8265"),
    ("localhost:8265", "http://localhost:8265"),
    ("http://[::1]:8265/", "http://[::1]:8265"),
    ("https://ray.example.com:8265/", "https://ray.example.com:8265"),
    ("http://ray.example.com:8265", "over plain http to ray.example.com"),
    ("http://10.0.0.7:8265", "over plain http to 10.0.0.7"),
    ("ray://ray.example.com:10001", "must be a Ray dashboard URL"),
    ("http://ray.example.com:port", "must be a Ray dashboard URL"),
    ("https://ops:hunter2@ray.example.com", "must not carry a user or password"),
])
def test_a_retrain_job_goes_only_where_its_token_is_safe(address: str, allowed: str) -> None:
    """`flywheel retrain --address` sends the local Ray token: never over plain http to another machine."""
    if allowed.startswith("http"):
        assert job_address(address) == allowed
        return
    with pytest.raises(ValueError, match=allowed) as refused:
        job_address(address)
    assert "hunter2" not in str(refused.value)


def test_insecure_allows_plain_http_to_another_machine_and_the_cli_says_why_it_refuses() -> None:
    assert job_address("http://ray.example.com:8265", insecure=True) == "http://ray.example.com:8265"
    refused = CliRunner().invoke(cli, ["retrain", "--address", "http://ray.example.com:8265", "--task", "demo"])
    assert refused.exit_code == 2 and "use https://, or --insecure" in refused.output


def test_a_run_is_alive_while_it_beats_and_dead_once_it_stops_read_from_any_machine(tmp_path: Path) -> None:
    """Liveness is the heartbeat beside the record, not a PID: a run on another machine (whose PID means
    nothing here) is running while it beats and failed once it has been silent too long."""
    writer, reader = RunStore(tmp_path / "runs"), RunStore(tmp_path / "runs")  # two processes, one shared home
    record = RunRecord(run_id="run-20260101-000000-dddddd", trigger="schedule", host="another-pod", pid=1,
                       stage="train")
    writer.save(record)
    with writer.heartbeat(record.run_id, every_s=0.05):
        time.sleep(0.2)
        assert reader.get(record.run_id).state == RunState.RUNNING
    old = (datetime.now(UTC) - timedelta(seconds=STALE_AFTER_S + 1)).isoformat()
    (writer.local_dir / f"{record.run_id}.beat").write_text(old)  # the beats stopped long ago
    dead = reader.get(record.run_id)
    assert dead.state == RunState.FAILED and "died at train: no heartbeat" in dead.message


def test_a_run_on_this_machine_whose_process_is_gone_is_dead_at_once(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.save(RunRecord(run_id="run-20260101-000000-eeeeee", trigger="cli", pid=gone.pid, stage="gate"))
    store.beat("run-20260101-000000-eeeeee")
    dead = store.get("run-20260101-000000-eeeeee")
    assert dead.state == RunState.FAILED and "its process" in dead.message


def test_a_home_counted_in_one_outcomes_file_keeps_its_counts(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "outcomes.json").write_text('[["demo", "passed", 7]]')  # as homes counted before issue 24
    store = RunStore(tmp_path / "runs")
    assert store.outcomes() == {("demo", "passed"): 7}
    store.save(RunRecord(run_id="run-20260101-000000-ffffff", trigger="schedule", task="demo",
                         state=RunState.PASSED, finished_at=datetime.now(UTC)))
    assert store.outcomes() == {("demo", "passed"): 8}
