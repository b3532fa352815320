"""The loop's lease in the registry's store, and the fencing of its leader's alias moves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flywheel.lease import StoreLease
from flywheel.registry import FencedError, Registry
from tests.test_registry import BASE, fake_adapter
from tests.test_registry_s3 import s3_endpoint  # noqa: F401 - the moto server fixture

ROOT = Path(__file__).resolve().parents[1]


def two_versions(registry: Registry, tmp_path: Path) -> None:
    for payload in (b"one", b"two"):
        registry.register(fake_adapter(tmp_path / payload.decode(), payload), base=BASE)


def test_one_keeper_leads_and_a_silent_one_loses_the_loop_and_its_moves(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "registry"), "demo")
    two_versions(registry, tmp_path)
    a, b = StoreLease(registry, "keeper-a", lease_s=0.5), StoreLease(registry, "keeper-b", lease_s=0.5)
    assert a.claim() == 1 and b.claim() is None and a.claim() == 1  # renewing keeps the epoch
    assert b.holder_now() == "keeper-a"
    registry.fenced(1).promote("demo-v1", actor="keeper-a")

    time.sleep(0.7)  # keeper-a stops renewing (paused, cut off): past its lease
    assert b.claim() == 2 and b.holder_now() == "keeper-b"
    with pytest.raises(FencedError, match=r"epoch 1.*epoch 2"):  # before keeper-a even notices
        registry.fenced(1).promote("demo-v2", actor="keeper-a")
    assert registry.alias("champion") == "demo-v1" and len(registry.history()) == 1
    assert a.claim() is None and a.epoch is None  # and it stands by
    entry = registry.fenced(2).promote("demo-v2", actor="keeper-b")
    assert entry.fence == 2 and registry.alias("champion") == "demo-v2"
    assert registry.promote("demo-v1", actor="ops").fence is None  # a move by hand is not a leader's


def test_a_release_hands_the_loop_over_at_once(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "registry"), "demo")
    a, b = StoreLease(registry, "keeper-a", lease_s=60), StoreLease(registry, "keeper-b", lease_s=60)
    assert a.claim() == 1 and b.claim() is None
    a.release()
    assert b.claim() == 2 and a.claim() is None


def test_a_move_under_an_epoch_the_history_has_passed_is_refused(tmp_path: Path) -> None:
    """The history itself fences: once a newer epoch moved this task's aliases, an older one cannot."""
    registry = Registry(str(tmp_path / "registry"), "demo")
    two_versions(registry, tmp_path)
    registry.fenced(7).promote("demo-v1", actor="keeper-b")
    with pytest.raises(FencedError):
        registry.fenced(6).promote("demo-v2", actor="keeper-a")
    assert Registry(registry.uri, "demo").alias("champion") == "demo-v1"  # from a fresh reader, checkpoint too


def test_a_scheduled_retrain_moves_aliases_under_its_leaders_epoch(tmp_path: Path) -> None:
    """The scheduler hands the leader's epoch to the runs it starts: a run whose leader lost the loop meanwhile
    ends `superseded` and leaves the aliases to the new leader; under the current epoch it promotes."""
    from flywheel.config import Settings
    from flywheel.runs import RunRecord, RunState, RunStore
    from training.pipeline import Retrain

    settings = Settings(home=tmp_path / "home", registry={"uri": str(tmp_path / "registry")})
    registry = Registry(settings.registry_uri, "demo")
    two_versions(registry, tmp_path)
    registry.promote("demo-v1", actor="flywheel train")
    a, b = StoreLease(registry, "keeper-a", lease_s=60), StoreLease(registry, "keeper-b", lease_s=60)
    assert a.claim() == 1

    store = RunStore.for_settings(settings)
    launched = store.launch([sys.executable, "-c", "import sys; print(sys.argv[1:])"], "schedule", "demo", fence=1)
    assert launched.fence == 1 and store.get(launched.run_id).fence == 1  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while "--fence" not in (store.local_dir / f"{launched.run_id}.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "'--fence', '1'" in (store.local_dir / f"{launched.run_id}.log").read_text()  # the child is told

    a.release()
    assert b.claim() == 2  # a new leader while the run went on
    stale = Retrain(settings, RunRecord(run_id="run-stale", trigger="schedule", task="demo", fence=1))
    record = stale._release("demo-v2", "demo-v1", "gate passed")
    assert record.state == RunState.SUPERSEDED and "lost the loop" in record.message, record.message
    assert registry.alias("champion") == "demo-v1" and len(registry.history()) == 1
    current = Retrain(settings, RunRecord(run_id="run-current", trigger="schedule", task="demo", fence=2))
    assert current._release("demo-v2", "demo-v1", "gate passed").state == RunState.PASSED
    assert registry.alias("champion") == "demo-v2" and registry.history()[-1].fence == 2


def test_retrain_refuses_a_fence_the_lease_never_reached(tmp_path: Path) -> None:
    """`--fence` (the scheduler's) under an epoch never claimed would lock the real leader out of every later move."""
    import yaml
    from typer.testing import CliRunner

    from flywheel.cli import app
    from flywheel.tasks import TaskSpec

    config = tmp_path / "flywheel.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), "registry": {"uri": str(tmp_path / "reg")}}))
    Registry(str(tmp_path / "reg"), "demo").save_task_spec(TaskSpec(name="demo", kind="generation", metric="token_f1"))
    refused = CliRunner().invoke(app, ["retrain", "--task", "demo", "--fence", "99", "--config", str(config)])
    assert refused.exit_code == 2 and "--fence 99 is not an epoch" in refused.output, refused.output
    assert Registry(str(tmp_path / "reg"), "demo").history() == []


def test_a_paused_leader_is_fenced_by_the_store_and_no_move_is_lost_or_doubled(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    """Two keepers (two processes, as two Ray clusters would run them) on one registry on the S3 API server:
    one leads; SIGSTOP it and the other takes over within the lease; SIGCONT it and its next move is refused
    by the store's fencing (or, where the request the pause cut is never answered, its next renewal sees the
    newer claim), after which it stands by. Every move either keeper made is in the history once, and no move
    under the old epoch lands after one under the new."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"flywheel-{uuid.uuid4().hex[:8]}"
    registry = Registry(f"s3://{bucket}/registry", "demo", storage_options={"endpoint_url": s3_endpoint})
    registry.fs.mkdir(bucket)
    two_versions(registry, tmp_path)
    lease_s, log = 2.0, tmp_path / "moves.jsonl"

    def keeper(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "tests.lease_keeper", registry.uri, "demo", name, str(log),
                                 str(lease_s), s3_endpoint], env=env, cwd=ROOT)

    def moves() -> list[dict[str, object]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def wait_for(condition: object, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, moves()[-5:]
            time.sleep(0.1)

    first = keeper("keeper-a")
    wait_for(lambda: any(m["outcome"] == "moved" for m in moves()), 60)
    second = keeper("keeper-b")
    try:
        time.sleep(lease_s)
        assert {m["name"] for m in moves()} == {"keeper-a"}  # exactly one leads
        first.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(lambda: any(m["name"] == "keeper-b" and m["outcome"] == "moved" for m in moves()), 30)
        assert time.monotonic() - stopped_at < 3 * lease_s  # taken over within the lease (and a renewal)
        first.send_signal(signal.SIGCONT)
        # its next write is refused by the store, or (if the request the pause cut was never answered) its next
        # renewal finds the newer claim first
        wait_for(lambda: any(m["name"] == "keeper-a" and m["outcome"] in ("refused", "standby") for m in moves()), 60)
        time.sleep(1)
    finally:
        for process in (first, second):
            process.send_signal(signal.SIGCONT)
            process.terminate()  # between two moves, so its log holds every move it made
        for process in (first, second):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    a_moves = [m for m in moves() if m["name"] == "keeper-a" and m["outcome"] != "failed"]
    resumed = next(i for i, m in enumerate(a_moves) if m["outcome"] in ("refused", "standby"))
    assert all(m["outcome"] == "moved" for m in a_moves[:resumed])  # nothing it wrote after the pause landed
    assert not any(m["outcome"] == "moved" for m in a_moves[resumed:])  # and then it stood by
    history = registry.history()
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    made = [e.reason for e in history]
    moved = {f"{m['name']}#{m['n']}" for m in moves() if m["outcome"] == "moved"}
    unanswered = {f"{m['name']}#{m['n']}" for m in moves() if m["outcome"] == "failed"}  # may have landed
    assert len(made) == len(set(made)) and moved <= set(made) <= moved | unanswered  # none lost, none doubled
    fences = [e.fence for e in history]
    assert fences == sorted(fences) and set(fences) == {1, 2}
