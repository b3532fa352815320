"""Runs on a store every pod shares (a directory, or S3 on moto's server): records, heartbeats, the retrain lock as
a lease, run logs and outcome counts, read by a pod other than the one that wrote them."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel import runs
from flywheel.cli import app as cli
from flywheel.config import Settings
from flywheel.runs import RetrainBusyError, RunRecord, RunState, RunStore

SECRET = "s3cret-" + uuid.uuid4().hex
Pod = Callable[[str], RunStore]  # a pod's RunStore, by the pod's name: its own home, the runs shared


@pytest.fixture(params=["disk", "s3"])
def pod(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pod:
    if request.param == "disk":
        return lambda name: RunStore(tmp_path / "shared-runs", local_dir=tmp_path / name / "runs")
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "flywheel-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"flywheel-{uuid.uuid4().hex[:8]}"

    def settings(name: str) -> Settings:
        return Settings(home=tmp_path / name, registry={"uri": f"s3://{bucket}/registry",
                                                        "storage_options": {"endpoint_url": endpoint}})

    RunStore.for_settings(settings("setup")).fs.mkdir(bucket)
    return lambda name: RunStore.for_settings(settings(name))


def test_runs_live_in_the_home_on_a_disk_and_beside_the_registry_on_an_object_store(tmp_path: Path) -> None:
    local = RunStore.for_settings(Settings(home=tmp_path / "home"))
    assert Path(local.root) == local.local_dir == tmp_path / "home" / "runs"
    remote = RunStore.for_settings(Settings(home=tmp_path / "home", registry={
        "uri": "s3://bucket/registry/", "storage_options": {"endpoint_url": "http://127.0.0.1:9"}}))
    assert remote.root == "bucket/registry/runs" and remote.local_dir == tmp_path / "home" / "runs"


def test_a_run_on_one_pod_is_running_on_another_while_it_beats_and_failed_once_silent(
    pod: Pod, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runs, "STALE_AFTER_S", 1.0)
    a, b = pod("pod-a"), pod("pod-b")
    record = RunRecord(run_id="run-20260101-000000-aaaaaa", trigger="schedule", host="pod-a", pid=1, stage="train")
    a.save(record)
    with a.heartbeat(record.run_id, every_s=0.1):
        time.sleep(0.3)
        assert b.get(record.run_id).state == RunState.RUNNING  # type: ignore[union-attr]
        assert [r.run_id for r in b.list()] == [record.run_id]
    time.sleep(1.2)  # the beats stopped
    dead = b.get(record.run_id)
    assert dead is not None and dead.state == RunState.FAILED and "died at train: no heartbeat" in dead.message


def test_two_launchers_race_for_the_lock_and_exactly_one_wins(pod: Pod) -> None:
    launchers = [pod(f"pod-{i}") for i in range(4)]
    start = threading.Barrier(len(launchers))
    won: list[int] = []
    lost: list[str] = []

    def launch(store: RunStore, run_id: str) -> None:
        start.wait()
        try:
            won.append(store.claim(run_id))
        except RetrainBusyError as exc:
            lost.append(str(exc))

    threads = [threading.Thread(target=launch, args=(s, f"run-20260101-000000-{i:06d}"))
               for i, s in enumerate(launchers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert won == [1] and len(lost) == 3
    assert all("already running" in message for message in lost)
    assert launchers[0].busy() and launchers[1].busy()


def test_the_lock_is_free_once_its_run_finishes_or_goes_silent(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pod("pod-a"), pod("pod-b")
    with a.exclusive("run-20260101-000000-aaaaaa"), pytest.raises(RetrainBusyError, match="run-20260101-000000-aaaaaa"):
        b.claim("run-20260101-000000-bbbbbb")
    assert not b.busy()  # released as the run ended
    epoch = b.claim("run-20260101-000000-bbbbbb")
    with pytest.raises(RetrainBusyError, match="no longer"), a.exclusive("run-20260101-000000-cccccc", claimed=epoch):
        pass  # a launcher's claim is its own run's only

    monkeypatch.setattr(runs, "STALE_AFTER_S", 0.5)
    b.save(RunRecord(run_id="run-20260101-000000-bbbbbb", trigger="admin", host="pod-b", pid=1))
    b.beat("run-20260101-000000-bbbbbb")
    assert a.busy()
    time.sleep(0.7)  # pod-b went quiet without releasing (killed, cut off)
    assert not a.busy() and a.claim("run-20260101-000000-dddddd") == epoch + 1


def test_a_runs_log_is_followed_from_another_pod_while_it_works_and_whole_once_it_ends(
    pod: Pod, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runs, "LOG_TAIL_BYTES", 4096)
    a, b = pod("pod-a"), pod("pod-b")
    run_id = "run-20260101-000000-aaaaaa"
    local_log = a.local_dir / f"{run_id}.log"
    a.local_dir.mkdir(parents=True, exist_ok=True)
    with a.exclusive(run_id), a.heartbeat(run_id, every_s=0.02):
        local_log.write_text("step=1 loss=2.0\n" * 1000 + "step=2 loss=1.5\n")
        assert a.read_log(run_id, 16) == "step=2 loss=1.5\n"  # its own pod reads the log itself
        deadline = time.monotonic() + 10
        while b.read_log(run_id, 16) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.read_log(run_id, 16) == "step=2 loss=1.5\n"  # a tail copied by its heartbeat
        assert len(b.read_log(run_id, 1 << 20) or "") == 4096
        with local_log.open("a") as more:
            more.write("gate passed\n")
    assert b.read_log(run_id, 12) == "gate passed\n"
    assert len(b.read_log(run_id, 1 << 20) or "") == local_log.stat().st_size  # whole once the run ended


def test_outcomes_finished_at_once_on_many_pods_are_all_counted(pod: Pod) -> None:
    pods = [pod(f"pod-{i}") for i in range(4)]
    start = threading.Barrier(len(pods))

    def finish(store: RunStore, i: int) -> None:
        start.wait()
        store.save(RunRecord(run_id=f"run-20260101-000000-{i:06d}", trigger="schedule", task="demo",
                             state=RunState.PASSED if i % 2 else RunState.REJECTED, finished_at=datetime.now(UTC)))

    threads = [threading.Thread(target=finish, args=(s, i)) for i, s in enumerate(pods)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pods[0].outcomes() == {("demo", "passed"): 2, ("demo", "rejected"): 2}


def test_no_storage_secret_is_written_to_the_store(pod: Pod) -> None:
    store = pod("pod-a")
    launched = store.launch([sys.executable, "-c", "print('training')"], "admin", "demo")
    launched.state, launched.finished_at = RunState.PASSED, datetime.now(UTC)
    store.save(launched)
    files = store.fs.find(store.root)
    assert any(f.endswith(f"{launched.run_id}.json") for f in files) and any("/lock/" in f for f in files)
    for path in files:
        assert SECRET not in store.fs.cat_file(path).decode(), path


def test_a_retrain_handed_a_claim_that_is_not_its_own_runs_nothing(tmp_path: Path) -> None:
    """`flywheel retrain --lock N` (a launcher's child) runs only while epoch N is still its run's claim."""
    config = tmp_path / "flywheel.yaml"
    config.write_text(f"home: {tmp_path / 'home'}\n")
    store = RunStore.for_settings(Settings(home=tmp_path / "home"))
    epoch = store.claim("run-20260101-000000-aaaaaa")
    refused = CliRunner().invoke(cli, ["retrain", "--config", str(config), "--task", "demo", "--lock", str(epoch),
                                       "--run-id", "run-20260101-000000-bbbbbb"])
    assert refused.exit_code == 3 and "no longer run-20260101-000000-bbbbbb's" in refused.output, refused.output
    assert store.get("run-20260101-000000-bbbbbb") is None and store.busy()
