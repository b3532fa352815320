"""The loop's lease in the registry's store, and the fencing of its leader's alias moves."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from flywheel.config import Settings
from flywheel.lease import StoreLease
from flywheel.registry import CANARY_ALIAS, FencedError, Registry
from tests.kafka_broker import KafkaBroker
from tests.test_registry import BASE, fake_adapter

ROOT = Path(__file__).resolve().parents[1]


def two_versions(registry: Registry, tmp_path: Path) -> None:
    for payload in (b"one", b"two"):
        registry.register(fake_adapter(tmp_path / payload.decode(), payload), base=BASE)


def keepers_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of keepers in processes of their own (and of this test): S3 credentials, as on a cluster,
    and this checkout on the path."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def s3_registry(s3_endpoint: str, tmp_path: Path) -> Registry:
    """Task `demo` with two versions, in a fresh bucket on the S3 API server."""
    bucket = f"flywheel-{uuid.uuid4().hex[:8]}"
    registry = Registry(f"s3://{bucket}/registry", "demo", storage_options={"endpoint_url": s3_endpoint})
    registry.fs.mkdir(bucket)
    two_versions(registry, tmp_path)
    return registry


def until(condition: Callable[[], object], timeout_s: float, context: Callable[[], object]) -> None:
    """Wait for `condition`; past `timeout_s`, fail showing `context()`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, context()
        time.sleep(0.1)


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


def test_a_keeper_that_takes_the_loop_over_forgets_all_but_the_epoch_before(tmp_path: Path) -> None:
    """Every renewal lists the lease's folder: years of takeovers (each pod restart one) must not make it long."""
    registry = Registry(str(tmp_path / "registry"), "demo")
    keepers = [StoreLease(registry, f"keeper-{n}", lease_s=60) for n in range(2)]
    for epoch in range(1, 8):
        assert keepers[epoch % 2].claim() == epoch
        keepers[epoch % 2].release()
    assert sorted(p.name for p in (tmp_path / "registry" / "loop" / "lease").iterdir()) == [
        "0000000006.beat", "0000000006.json", "0000000007.beat", "0000000007.json"]
    assert keepers[0].claim() == 8 and registry.loop_epoch() == 8


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
    assert record.state == RunState.SUPERSEDED and "lease it was made under (epoch 1) was taken over (epoch 2)" \
        in record.message, record.message
    assert registry.alias("champion") == "demo-v1" and len(registry.history()) == 1
    current = Retrain(settings, RunRecord(run_id="run-current", trigger="schedule", task="demo", fence=2))
    assert current._release("demo-v2", "demo-v1", "gate passed").state == RunState.PASSED
    assert registry.alias("champion") == "demo-v2" and registry.history()[-1].fence == 2


def test_a_retrain_whose_lock_was_taken_over_while_it_was_silent_moves_no_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A manual retrain holds the retrain lock by its heartbeat. Cut off from the store past STALE_AFTER_S (an S3
    outage), it is judged dead and another run takes the lock over; when it comes back, its release is refused
    by the lock's newer epoch, not made beside the other run's."""
    from flywheel import runs
    from flywheel.config import Settings
    from flywheel.runs import RunRecord, RunState, RunStore
    from training.pipeline import Retrain

    settings = Settings(home=tmp_path / "home", registry={"uri": str(tmp_path / "registry")})
    registry = Registry(settings.registry_uri, "demo")
    two_versions(registry, tmp_path)
    registry.promote("demo-v1", actor="flywheel train")
    store = RunStore.for_settings(settings)
    monkeypatch.setattr(runs, "STALE_AFTER_S", 0.3)
    with store.exclusive("run-20260101-000000-aaaaaa") as epoch:
        silent = Retrain(settings, RunRecord(run_id="run-20260101-000000-aaaaaa", trigger="admin", task="demo",
                                             lock=epoch))
        store.save(silent.record)
        store.beat(silent.record.run_id)
        time.sleep(0.5)  # no beat reached the store
        taken = store.claim("run-20260101-000000-bbbbbb")
        record = silent._release("demo-v2", "demo-v1", "gate passed")
    assert taken == epoch + 1
    assert record.state == RunState.SUPERSEDED and (
        f"retrain lock (epoch {epoch}) was taken over by run-20260101-000000-bbbbbb (epoch {taken})") in record.message
    assert registry.alias("champion") == "demo-v1" and len(registry.history()) == 1
    holder = Retrain(settings, RunRecord(run_id="run-20260101-000000-bbbbbb", trigger="admin", task="demo",
                                         lock=taken))
    assert holder._release("demo-v2", "demo-v1", "gate passed").state == RunState.PASSED
    assert registry.alias("champion") == "demo-v2"


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
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two keepers (two processes, as two Ray clusters would run them) on one registry on the S3 API server:
    one leads; SIGSTOP it and the other takes over within the lease; SIGCONT it and its next move is refused
    by the store's fencing (or, where the request the pause cut is never answered, its next renewal sees the
    newer claim), after which it stands by. Every move either keeper made is in the history once, and no move
    under the old epoch lands after one under the new."""
    env = keepers_env(monkeypatch)
    registry = s3_registry(s3_endpoint, tmp_path)
    lease_s, log = 2.0, tmp_path / "moves.jsonl"

    def keeper(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "tests.lease_keeper", registry.uri, "demo", name, str(log),
                                 str(lease_s), s3_endpoint], env=env, cwd=ROOT)

    def moves() -> list[dict[str, object]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def wait_for(condition: Callable[[], object], timeout_s: float) -> None:
        until(condition, timeout_s, lambda: moves()[-5:])

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


TRIAL_S = 2.0  # each canary trial's deadline: the keeper's canary controller rolls it back then


def keep_a_canary_on_trial(registry: Registry, stop: threading.Event) -> None:
    """What a retrain of a `rollout: canary` task does, by hand: whenever no canary is on trial, put demo-v2 on
    trial (a move by hand, unfenced). The leading keeper's canary controller ends each trial at its deadline."""
    while not stop.wait(0.3):
        with contextlib.suppress(Exception):  # the store did not answer: look again
            if registry.canary_on_trial() is None:
                registry.promote("demo-v2", alias=CANARY_ALIAS, traffic_fraction=0.05, actor="ops", reason="trial")


def cluster_settings(name: str, registry: Registry, s3_endpoint: str, bootstrap: str, tmp_path: Path) -> Settings:
    """A cluster's settings: its own home and app; the one registry, broker topics and curator group; the lease
    short, and canary trials that end at their deadline whatever the (absent) ratings."""
    s3 = {"endpoint_url": s3_endpoint,  # a request the pause cut fails within seconds, not botocore's minutes
          "config_kwargs": {"connect_timeout": 3, "read_timeout": 3, "retries": {"max_attempts": 2}}}
    return Settings(
        home=tmp_path / f"home-{name}", serving={"app_name": name},
        registry={"uri": registry.uri, "storage_options": s3},
        loop={"lease_s": 6.0}, retrain={"schedule_enabled": False},
        canary={"steps": [0.05], "deadline_s": TRIAL_S, "on_deadline": "rollback", "check_every_s": 3.0},
        feedback={"kafka_bootstrap": bootstrap, "kafka_api_version": "0.9", "predictions_topic": "two.predictions",
                  "feedback_topic": "two.feedback", "consumer_group": "two-clusters"},
    )


class Cluster:
    """tests/loop_cluster.py in a process of its own: one Ray cluster running the real LoopKeeper alone."""

    def __init__(self, settings: Settings, env: dict[str, str], tmp_path: Path) -> None:
        self.name = settings.serving.app_name
        config = tmp_path / f"{self.name}.yaml"
        config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json(
            include={"home", "serving", "registry", "loop", "retrain", "canary", "feedback"}))))
        self.temp_dir = tempfile.mkdtemp(prefix=f"ray-{self.name}-", dir="/tmp")  # short: Ray's socket paths
        self.status_path, self.log_path = tmp_path / f"{self.name}.status", tmp_path / f"{self.name}.log"
        with self.log_path.open("wb") as log:
            self.driver = subprocess.Popen(  # the keeper's log lines reach the driver's output, each one
                [sys.executable, "-m", "tests.loop_cluster", str(config), self.temp_dir, str(self.status_path)],
                env={**env, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}, cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def lines(self) -> list[dict[str, Any]]:
        text = self.status_path.read_text() if self.status_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def status(self) -> dict[str, Any] | None:
        """The keeper's latest answer (None before its first, or while it does not answer)."""
        lines = self.lines()
        return lines[-1]["status"] if lines else None

    def keeper_pid(self) -> int:
        return int(self.lines()[0]["pid"])

    def signal(self, signum: int) -> None:
        os.kill(self.keeper_pid(), signum)

    def stop(self) -> None:
        """SIGTERM the driver (it stops its cluster), then kill by pid whatever of the cluster is left."""
        try:
            family = psutil.Process(self.driver.pid).children(recursive=True)
        except psutil.Error:
            family = []
        for process in family:  # a paused keeper would not hear its SIGTERM
            with contextlib.suppress(psutil.Error):
                process.resume()
        self.driver.terminate()
        try:
            self.driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            self.driver.wait(timeout=10)
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.mark.serve
@pytest.mark.kafka
def test_real_keepers_in_two_ray_clusters_one_leads_and_a_paused_one_is_fenced(
    s3_endpoint: str, kafka_broker: KafkaBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two Ray clusters on one box, each running the real LoopKeeper deployment (and nothing else), share one
    registry on the S3 API server and one broker: exactly one keeper leads, and its canary controller ends each
    canary trial at its deadline under its epoch. SIGSTOP the leader's replica and the other cluster's keeper
    takes over within the lease; SIGCONT it and it stands by, its next move (if it makes one before its renewal
    finds the newer claim) refused by the store's fencing, as a move under its epoch is. Every trial is ended
    exactly once, at its deadline, and no move under the old epoch lands after one under the new."""
    env = keepers_env(monkeypatch)
    registry = s3_registry(s3_endpoint, tmp_path)
    registry.promote("demo-v1", actor="ops")
    clusters = [Cluster(cluster_settings(name, registry, s3_endpoint, kafka_broker.bootstrap, tmp_path), env, tmp_path)
                for name in ("cluster-a", "cluster-b")]
    ops, stop_ops = Registry(registry.uri, "demo", storage_options={"endpoint_url": s3_endpoint}), threading.Event()
    operator = threading.Thread(target=keep_a_canary_on_trial, args=(ops, stop_ops), daemon=True)

    def statuses() -> list[dict[str, Any] | None]:
        return [cluster.status() for cluster in clusters]

    def ends_under(epoch: int) -> int:
        return sum(e.action == "end" and e.fence == epoch for e in registry.history(CANARY_ALIAS))

    def role(cluster: Cluster) -> str | None:
        return (cluster.status() or {}).get("role")

    def one_leads() -> bool:
        """Exactly one keeper leads, and the other stands by naming it."""
        a, b = sorted(statuses(), key=lambda s: (s or {}).get("role") != "leading")
        return (a or {}).get("role") == "leading" and (b or {}).get("role") == "standby" and b["leader"] == a["keeper"]

    try:
        operator.start()
        until(one_leads, 240, statuses)  # both clusters start at once: their keepers race for epoch 1
        leader, other = sorted(clusters, key=lambda c: role(c) != "leading")
        old_epoch = int((leader.status() or {})["epoch"])
        until(lambda: ends_under(old_epoch), 60, registry.history)  # its canary controller ends trials

        leader.signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        until(lambda: role(other) == "leading", 3 * 6.0, statuses)
        taken_over_s = time.monotonic() - paused_at
        new_epoch = int((other.status() or {})["epoch"])
        assert new_epoch > old_epoch
        until(lambda: ends_under(new_epoch), 30, registry.history)
        # resume it when a trial is past its deadline, so that its canary controller's first look has a move to try
        until(lambda: (trial := registry.canary_on_trial()) is not None
              and (datetime.now(UTC) - trial.set_at).total_seconds() > TRIAL_S, 30, registry.history)
        leader.signal(signal.SIGCONT)
        until(lambda: role(leader) == "standby", 60, statuses)  # once its parts have stopped
        assert (leader.status() or {})["leader"] == (other.status() or {})["keeper"]
        # the move it would make under its old epoch, whichever of its threads woke first: refused by the store
        with pytest.raises(FencedError, match=f"epoch {old_epoch}. was taken over .epoch {new_epoch}"):
            ops.fenced(old_epoch).promote("demo-v1", actor="canary-controller", reason="the old leader's move")
        ended = ends_under(new_epoch)
        until(lambda: ends_under(new_epoch) >= ended + 2, 30, registry.history)  # the new leader goes on
        stop_ops.set()
        operator.join(timeout=30)
        until(lambda: registry.canary_on_trial() is None, 30, registry.history)  # the last trial ends too
        assert role(leader) == "standby" and role(other) == "leading"
    finally:
        stop_ops.set()
        for cluster in clusters:
            cluster.stop()

    refused = "was taken over" in leader.log_path.read_text()
    print(f"takeover in {taken_over_s:.1f}s; the resumed keeper's next move was "
          f"{'refused by the store' if refused else 'never made: its renewal found the newer claim first'}")
    assert taken_over_s < 6.0 + 2 * 6.0 / 3 + 3  # the lease, a renewal's period, and the store's answers
    history = registry.history()
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    trials = [e for e in history if e.alias == CANARY_ALIAS]
    assert [e.action for e in trials] == ["promote", "end"] * (len(trials) // 2)  # each trial ended exactly once
    for start, end in zip(trials[::2], trials[1::2], strict=True):
        assert end.actor == "canary-controller" and (end.at - start.at).total_seconds() >= TRIAL_S, end  # never early
    fences = [e.fence for e in trials if e.action == "end"]
    assert fences == sorted(fences) and {old_epoch, new_epoch} <= set(fences), fences  # old never after new
