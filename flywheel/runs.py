"""Retrain runs: one JSON record per run, and a lock so only one retrain runs at a time.

Shared by the training plane (which does runs) and the serving plane (whose admin routes and
scheduler start them and show their state). The lock is an OS file lock held by the process doing the
run, so a crashed run releases it by dying. A running run beats a heartbeat file beside its record; a
record left `running` whose heartbeat went silent reads `failed`, from whichever machine reads it (a PID
is consulted only on its own machine, to notice a death sooner).
A launcher takes the lock itself and hands the open descriptor to the child, so two triggers racing
cannot both start a run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field

from flywheel.auth import is_loopback
from flywheel.config import SHARED_SETTINGS_ENV, Settings

log = logging.getLogger("flywheel.runs")


class RetrainBusyError(RuntimeError):
    """Another retrain holds the lock."""


class RunState(StrEnum):
    RUNNING = "running"
    PASSED = "passed"
    REJECTED = "rejected"
    INSUFFICIENT_DATA = "insufficient_data"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # passed its gate, but the champion it was judged against changed meanwhile


class RunRecord(BaseModel):
    run_id: str
    task: str | None = Field(None, description="The task retrained (None: the default task).")
    state: RunState = RunState.RUNNING
    stage: str = "starting"
    stages: dict[str, datetime] = Field(default_factory=dict, description="When each stage began.")
    trigger: str
    host: str = Field(default_factory=socket.gethostname, description="The machine (pod) the run works on.")
    pid: int = Field(default_factory=os.getpid, description="Its process there: for ops on that machine; "
                                                            "liveness is the heartbeat, readable from anywhere.")
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    champion_before: str | None = None
    fence: int | None = Field(None, description="The loop lease's epoch of the leader that started it (a scheduled "
                              "run): its alias moves are refused once a newer leader has taken the loop over.")
    version: str | None = None
    dataset: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    report: dict[str, Any] | None = None
    message: str = ""

    @property
    def verdict(self) -> str:
        return self.state.value


def new_run_id() -> str:
    return f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


HEARTBEAT_S = 5.0  # how often a running run says it is alive
STALE_AFTER_S = 60.0  # a running run silent this long is dead, read from any machine (clock skew included)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its launcher is a zombie: dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


OUTCOMES = "outcomes.json"


class RunStore:
    def __init__(self, root: Path, keep: int = 500) -> None:
        """`keep`: finished runs whose record and log are kept; older ones go when a run finishes."""
        self.root = root
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def _lock(self) -> int:
        """An open descriptor holding the retrain lock, or RetrainBusyError naming the running run."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            running = [r.run_id for r in self.list() if r.state == RunState.RUNNING]
            raise RetrainBusyError(
                f"a retrain is already running ({', '.join(running) or 'starting'}); one at a time"
            ) from None
        return fd

    def busy(self) -> bool:
        try:
            os.close(self._lock())
        except RetrainBusyError:
            return True
        return False

    @contextmanager
    def exclusive(self, inherited_fd: int | None = None) -> Iterator[None]:
        """Hold the retrain lock for the block (or keep the one a launcher handed over)."""
        fd = inherited_fd if inherited_fd is not None else self._lock()
        try:
            yield
        finally:
            os.close(fd)

    def launch_retrain(self, settings: Settings, trigger: str, task: str, fence: int | None = None) -> RunRecord:
        """`flywheel retrain` of `task` in a fresh process, with these exact settings (and this Ray cluster,
        if any). The settings and secrets travel in the child's environment: nothing is written to disk.
        `fence`: the loop lease epoch of the leader starting it, which the run's alias moves carry."""
        import ray

        if ray.is_initialized():
            settings = settings.model_copy(update={"ray": settings.ray.model_copy(
                update={"address": ray.get_runtime_context().gcs_address})})
        return self.launch([sys.executable, "-m", "flywheel.cli", "retrain", "--task", task], trigger, task,
                           env=settings.child_env(), fence=fence)

    def launch(self, command: list[str], trigger: str, task: str | None = None,
               env: dict[str, str] | None = None, fence: int | None = None) -> RunRecord:
        """Start `command` (a `flywheel retrain` child) holding the lock; return the new run's record.

        The child gets the locked descriptor as `--lock-fd`; this process drops its copy, so the lock
        lives exactly as long as the child.
        """
        fd = self._lock()
        run_id = new_run_id()
        try:
            with (self.root / f"{run_id}.log").open("ab") as log_file:
                child = subprocess.Popen(
                    [*command, "--run-id", run_id, "--trigger", trigger, "--lock-fd", str(fd),
                     *(["--fence", str(fence)] if fence is not None else [])],
                    pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env,
                )
        finally:
            os.close(fd)
        threading.Thread(target=child.wait, name=f"reap-{run_id}", daemon=True).start()
        record = RunRecord(run_id=run_id, trigger=trigger, pid=child.pid, task=task, fence=fence)
        self.save(record)
        self.beat(run_id)  # for the child's start-up, until its own heartbeat begins
        return record

    def beat(self, run_id: str) -> None:
        """Say that `run_id` is alive now (a file of its own: the run's record is written by its stages)."""
        tmp = self.root / f".{run_id}.{uuid.uuid4().hex}.beat"
        tmp.write_text(datetime.now(UTC).isoformat())
        os.replace(tmp, self.root / f"{run_id}.beat")

    def last_beat(self, run_id: str) -> datetime | None:
        try:
            return datetime.fromisoformat((self.root / f"{run_id}.beat").read_text())
        except (OSError, ValueError):
            return None

    @contextmanager
    def heartbeat(self, run_id: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
        """Beat for `run_id` every `every_s` while the block runs."""
        stop = threading.Event()

        def beat_until_stopped() -> None:
            while True:
                try:
                    self.beat(run_id)
                except OSError as exc:  # a full or flaky disk: the run goes on; readers may call it dead
                    log.warning("event=heartbeat_failed run_id=%s error=%s", run_id, exc)
                if stop.wait(every_s):
                    return

        beating = threading.Thread(target=beat_until_stopped, name=f"heartbeat-{run_id}", daemon=True)
        beating.start()
        try:
            yield
        finally:
            stop.set()
            beating.join()

    def save(self, record: RunRecord) -> None:
        path = self.root / f"{record.run_id}.json"
        finishing = record.finished_at is not None and not (
            path.exists() and RunRecord.model_validate_json(path.read_text()).finished_at is not None)
        tmp = self.root / f".{record.run_id}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(record.model_dump_json(indent=2))
        os.replace(tmp, path)
        if finishing:
            self._count_outcome(record)
        if record.finished_at is not None:
            self._forget_old()

    def _count_outcome(self, record: RunRecord) -> None:
        """Verdicts ever, per task: a counter that survives the pruning of old records (for /metrics)."""
        fd = os.open(self.root / ".outcomes.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            counts = self.outcomes()
            key = (record.task or "-", record.state.value)
            counts[key] = counts.get(key, 0) + 1
            tmp = self.root / f".{OUTCOMES}.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps([[task, verdict, n] for (task, verdict), n in sorted(counts.items())]))
            os.replace(tmp, self.root / OUTCOMES)
        finally:
            os.close(fd)

    def outcomes(self) -> dict[tuple[str, str], int]:
        """(task, verdict) -> finished runs, ever."""
        path = self.root / OUTCOMES
        return {(task, verdict): n for task, verdict, n in json.loads(path.read_text())} if path.exists() else {}

    def summary(self) -> dict[str, Any]:
        """What /metrics shows of retraining: verdicts ever, gate rejections in a row, the last gate's scores.

        A streak of rejections is broken only by a pass: runs that never reached the gate (too little data,
        a crash) neither extend nor break it.
        """
        rejections: dict[str, int] = {}
        passed: set[str] = set()
        gate: dict[tuple[str, str, str], float] = {}
        for record in reversed(self.list()):  # newest first
            if record.finished_at is None:
                continue
            task = record.task or "-"
            rejections.setdefault(task, 0)
            if record.state == RunState.PASSED:
                passed.add(task)
            elif record.state == RunState.REJECTED and task not in passed:
                rejections[task] += 1
            scores = (record.report or {}).get("scores") or {}
            if scores and not any(key[0] == task for key in gate):
                gate.update({(task, arm, name): by_slice[name]["score"]
                             for arm, by_slice in scores.items() for name in by_slice})
        return {"outcomes": self.outcomes(), "rejections_in_a_row": rejections, "gate": gate}

    def _forget_old(self) -> None:
        """Delete the oldest finished runs' records and logs beyond `keep` (run ids sort by start time)."""
        finished = [p for p in sorted(self.root.glob("run-*.json"))
                    if RunRecord.model_validate_json(p.read_text()).finished_at is not None]
        for path in finished[:max(0, len(finished) - self.keep)]:
            path.unlink(missing_ok=True)
            path.with_suffix(".log").unlink(missing_ok=True)
            path.with_suffix(".beat").unlink(missing_ok=True)

    def get(self, run_id: str) -> RunRecord | None:
        path = self.root / f"{run_id}.json"
        if not path.exists():
            return None
        record = RunRecord.model_validate_json(path.read_text())
        if record.state == RunState.RUNNING:
            last = self.last_beat(run_id) or record.started_at
            silent_s = (datetime.now(UTC) - last).total_seconds()
            if silent_s > STALE_AFTER_S:
                record.state = RunState.FAILED
                record.message = f"the run died at {record.stage}: no heartbeat for {silent_s:.0f} s"
            elif record.host == socket.gethostname() and not process_alive(record.pid):  # known at once here
                record.state = RunState.FAILED
                record.message = f"the run died at {record.stage}: its process {record.pid} is gone"
        return record

    def list(self, limit: int | None = None) -> list[RunRecord]:
        names = sorted(p.stem for p in self.root.glob("run-*.json"))
        if limit:
            names = names[-limit:]
        return [r for r in (self.get(n) for n in names) if r]



JOB_AGENT_WAIT_S = 60.0  # how long a submission waits for a freshly started cluster's job agent


class RetrainJob(BaseModel):
    """A retrain submitted to a Ray cluster as a Ray job (`flywheel retrain --address`)."""

    job_id: str
    status: str
    exit_code: int | None = Field(None, description="`flywheel retrain`'s own exit code; None: it never ran.")
    message: str = ""
    output: str = Field("", description="What the run printed (its stdout and stderr).")


def _jobs_client(address: str) -> Any:
    """Ray's Jobs API at `address`, sending a local Ray auth token as `ray.init` does."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise ConnectionError("the cluster needs its Ray auth token: set RAY_AUTH_TOKEN, or put it in "
                              "~/.ray/auth_token") from exc


def job_address(address: str, *, insecure: bool = False) -> str:
    """The Jobs API URL to send a retrain, and the local Ray auth token, to.

    https anywhere; plain http only to this machine, unless `insecure` (the token would cross the network in
    clear). A bare HOST:PORT means http.
    """
    parsed = urlsplit(address if "://" in address else f"http://{address}")
    try:
        host, _ = parsed.hostname, parsed.port  # a port that is not a number raises here
    except ValueError:
        host = None
    if parsed.username or parsed.password:  # not echoed: it would print the password
        raise ValueError("--address must not carry a user or password; the Ray auth token is sent instead")
    if parsed.scheme not in ("http", "https") or not host:
        raise ValueError(f"--address must be a Ray dashboard URL such as https://HOST:8265, not {address!r}")
    if parsed.scheme == "http" and not is_loopback(host) and not insecure:
        raise ValueError(f"refusing to send the job and the Ray auth token over plain http to {host}: use "
                         "https://, or --insecure on a network you trust")
    return urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))


def submit_retrain_job(address: str, task: str | None, settings: Settings | None) -> str:
    """Submit `flywheel retrain --wait --json` to the Ray cluster whose dashboard is at `address`, as `ray job
    submit` would: it runs there, with the cluster's own config and secrets, or with `settings` (the secrets
    never travel: a job's environment is visible on the dashboard). Returns the job's id."""
    import shlex

    client = _jobs_client(address)
    command = ["python", "-m", "flywheel.cli", "retrain", "--wait", "--json", "--trigger", "ray-job"]
    command += ["--task", task] if task else []
    runtime_env = {"env_vars": {SHARED_SETTINGS_ENV: json.dumps(settings.shareable())}} if settings else None
    deadline = time.monotonic() + JOB_AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env,
                                     submission_id=f"flywheel-retrain-{uuid.uuid4().hex[:12]}",
                                     metadata={"flywheel": "retrain", "task": task or ""})
        except RuntimeError as exc:  # a cluster just started has no job agent yet: Ray says to try again later
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow_retrain_job(address: str, job_id: str, say: Callable[[str], None]) -> RetrainJob:
    """Pass the job's output to `say` as it comes, until the job ends; then its outcome."""
    import asyncio

    client = _jobs_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            say(chunk.rstrip("\n"))

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    return RetrainJob(job_id=job_id, status=str(info.status), exit_code=info.driver_exit_code,
                      message=info.message or "", output=client.get_job_logs(job_id))
