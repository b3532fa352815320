"""Retrain runs: one JSON record per run, and a lock so only one retrain runs at a time.

Shared by the training plane (which does runs) and the serving plane (whose admin routes and
scheduler start them and show their state). Runs live in a store every machine of the loop can read: the
local home's `runs/` folder, or, when the registry is on an object store, a `runs/` folder beside the
registry's own (pods of a cluster share no disk).

A running run beats a heartbeat file beside its record; a record left `running` whose heartbeat went
silent reads `failed`, from whichever machine reads it (a PID is consulted only on its own machine, to
notice a death sooner).

The lock is a lease on the same store, not an OS file lock (which means nothing to another pod): a claim
is an epoch, `lock/<epoch>.json` naming the run, created exclusively (a hard link on a disk, a conditional
put on S3), so of two triggers racing for the next epoch exactly one wins. The claim is held while its run
is: the run's heartbeat keeps it, its finish releases it, and a run judged dead (silent too long, or its
process gone on this machine) frees it. A launcher claims for the run it starts and hands the epoch to the
child (`--lock N`).
"""

from __future__ import annotations

import itertools
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

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field, ValidationError

from flywheel.auth import is_loopback
from flywheel.config import SHARED_SETTINGS_ENV, Settings
from flywheel.registry import create_exclusive, forget_epochs_before, latest_epoch
from flywheel.store import put_whole

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
    lock: int | None = Field(None, description="The retrain lock's epoch the run holds: its alias moves are refused "
                             "once another run has taken the lock over (this one's heartbeat was silent too long).")
    version: str | None = None
    dataset: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    report: dict[str, Any] | None = None
    message: str = ""

    @property
    def verdict(self) -> str:
        return self.state.value


class LockClaim(BaseModel):
    """One epoch of the retrain lock: the run it was claimed for, and whether that run has let it go."""

    epoch: int
    run_id: str
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid, description="The claimer: a launcher until its child has a record.")
    claimed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    released_at: datetime | None = None


def new_run_id() -> str:
    return f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


HEARTBEAT_S = 5.0  # how often a running run says it is alive
LOG_EVERY_BEATS = 6  # a running run's log reaches the store every 30 s: its tail (S3 cannot append) ...
LOG_TAIL_BYTES = 1 << 20  # ... this long, more than a console shows; the whole log once the run ends
STALE_AFTER_S = 60.0  # a running run silent this long is dead, read from any machine (clock skew included)
LEGACY_OUTCOMES = "outcomes.json"  # a home's counts from before they were numbered: the first numbered one adds to it
COUNT_ATTEMPTS = 50  # tries at adding a finished run to the outcome counts while other runs add theirs


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


class RunStore:
    def __init__(self, uri: str | Path, keep: int = 500, *, storage_options: dict[str, Any] | None = None,
                 local_dir: Path | None = None) -> None:
        """Runs at `uri`, a local path or an fsspec URL opened with `storage_options` (credentials come from the
        environment or those options, never from a record). `local_dir`: this machine's folder for the logs and
        work of the runs it does (default: `uri` itself, when that is a local path). `keep`: finished runs whose
        record and log are kept; older ones go when a run finishes."""
        self.fs, self.root = fsspec.core.url_to_fs(str(uri).rstrip("/"), **(storage_options or {}))
        if local_dir is None and not isinstance(self.fs, LocalFileSystem):
            raise ValueError(f"runs on {uri} need a local_dir for the logs of the runs this machine does")
        self.local_dir = local_dir or Path(self.root)
        self.keep = keep
        self._finished: dict[str, RunRecord] = {}  # records of finished runs read here: final, so read once
        self.local_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):  # an object store has no folders to make
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_settings(cls, settings: Settings) -> RunStore:
        """The runs of the loop these settings run: the home's `runs/` when the registry is on this machine's
        disk, else `runs/` beside the registry on its store, where every pod sees them."""
        local_dir = settings.home / "runs"
        registry_fs, _ = fsspec.core.url_to_fs(settings.registry_uri, **settings.registry.storage_options)
        if isinstance(registry_fs, LocalFileSystem):
            return cls(local_dir, keep=settings.retrain.keep_runs)
        return cls(f"{settings.registry_uri.rstrip('/')}/runs", keep=settings.retrain.keep_runs,
                   storage_options=settings.registry.storage_options, local_dir=local_dir)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _read(self, name: str) -> str:
        with self.fs.open(self._path(name), "rb") as f:
            return f.read().decode()

    def _write(self, name: str, text: str) -> None:
        put_whole(self.fs, self._path(name), text.encode(), exclusive=False)

    def _names(self, folder: str = "") -> list[str]:
        """The files in the store's root (or `folder` under it), fresh: another machine may have written since."""
        path = self._path(folder) if folder else self.root
        self.fs.invalidate_cache(path)
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    # -- the lock ------------------------------------------------------------------------------------

    def _claim_name(self, epoch: int) -> str:
        return f"lock/{epoch:010d}.json"

    def _holder(self) -> tuple[int, LockClaim | None]:
        """The latest epoch of the lock, and its claim while that holds the lock (None: the lock is free)."""
        epoch = latest_epoch(self.fs, self._path("lock"))
        if epoch == 0:
            return 0, None
        try:
            claim = LockClaim.model_validate_json(self._read(self._claim_name(epoch)))
        except (OSError, ValidationError):  # forgotten since the listing, or damaged: not a claim anyone holds
            return epoch, None
        if claim.released_at is not None:
            return epoch, None
        # a run not yet recorded (its launcher is starting it) is judged by its claim, as a record would be
        run = self.get(claim.run_id) or self._judged(RunRecord(
            run_id=claim.run_id, trigger="lock", host=claim.host, pid=claim.pid, started_at=claim.claimed_at))
        return epoch, claim if run.state == RunState.RUNNING else None

    def _busy_error(self, claim: LockClaim) -> RetrainBusyError:
        return RetrainBusyError(f"a retrain is already running ({claim.run_id}); one at a time")

    def claim(self, run_id: str) -> int:
        """Take the retrain lock for `run_id`: its epoch, or RetrainBusyError naming the running run."""
        epoch, holder = self._holder()
        if holder is not None:
            raise self._busy_error(holder)
        claim = LockClaim(epoch=epoch + 1, run_id=run_id)
        if not create_exclusive(self.fs, self._path(self._claim_name(claim.epoch)), claim.model_dump_json()):
            _, winner = self._holder()  # another trigger claimed this epoch first
            raise self._busy_error(winner or claim.model_copy(update={"run_id": "starting"}))
        log.info("event=retrain_lock_claimed run_id=%s epoch=%d", run_id, claim.epoch)
        return claim.epoch

    def release(self, epoch: int) -> None:
        """Let the lock go (it is free at once), and forget the epochs before it."""
        name = self._claim_name(epoch)
        try:
            claim = LockClaim.model_validate_json(self._read(name))
        except FileNotFoundError:  # a run that took the lock over (this one went silent) has forgotten it
            return
        self._write(name, claim.model_copy(update={"released_at": datetime.now(UTC)}).model_dump_json())
        forget_epochs_before(self.fs, self._path("lock"), epoch)

    def busy(self) -> bool:
        return self._holder()[1] is not None

    def lock_lost(self, run_id: str, epoch: int) -> str | None:
        """Why `run_id` no longer holds the lock's `epoch` (another run has claimed a newer one); None while it does."""
        latest = latest_epoch(self.fs, self._path("lock"))
        if latest == epoch:
            return None
        try:
            taker = LockClaim.model_validate_json(self._read(self._claim_name(latest))).run_id
        except (OSError, ValidationError):
            taker = "another run"
        return (f"run {run_id}'s retrain lock (epoch {epoch}) was taken over by {taker} (epoch {latest}) while its "
                f"heartbeat was silent over {STALE_AFTER_S:.0f} s")

    @contextmanager
    def exclusive(self, run_id: str, claimed: int | None = None) -> Iterator[int]:
        """Hold the retrain lock for `run_id` through the block (which gets its epoch): claim it, or keep the epoch
        a launcher claimed for it (`claimed`, refused if another run has taken the lock since). The run's heartbeat
        keeps it; the block's end releases it, and leaves the run's log in the store."""
        if claimed is None:
            epoch = self.claim(run_id)
        else:
            latest, holder = self._holder()
            if holder is None or holder.run_id != run_id or latest != claimed:
                raise RetrainBusyError(f"the retrain lock's epoch {claimed} is no longer {run_id}'s: "
                                       f"{holder.run_id if holder else 'nobody'} holds it")
            epoch = claimed
        try:
            yield epoch
        finally:
            try:
                self.publish_log(run_id)
            except OSError as exc:  # the outcome is in the record; the log stays on this machine (its `host`)
                log.warning("event=run_log_not_published run_id=%s error=%s", run_id, exc)
            self.release(epoch)

    # -- starting a run ------------------------------------------------------------------------------

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

        This process claims the lock for the new run and hands the epoch to the child as `--lock`; from then
        the child's heartbeat holds it, and its finish releases it. Its output goes to a log on this machine.
        """
        run_id = new_run_id()
        epoch = self.claim(run_id)
        try:
            with (self.local_dir / f"{run_id}.log").open("ab") as log_file:
                child = subprocess.Popen(
                    [*command, "--run-id", run_id, "--trigger", trigger, "--lock", str(epoch),
                     *(["--fence", str(fence)] if fence is not None else [])],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env,
                )
        except BaseException:  # no child to hold the lock: free it now, not when the claim goes stale
            self.release(epoch)
            raise
        threading.Thread(target=child.wait, name=f"reap-{run_id}", daemon=True).start()
        record = RunRecord(run_id=run_id, trigger=trigger, pid=child.pid, task=task, fence=fence)
        self.save(record)
        self.beat(run_id)  # for the child's start-up, until its own heartbeat begins
        return record

    # -- liveness ------------------------------------------------------------------------------------

    def beat(self, run_id: str) -> None:
        """Say that `run_id` is alive now (a file of its own: the run's record is written by its stages)."""
        self._write(f"{run_id}.beat", datetime.now(UTC).isoformat())

    def last_beat(self, run_id: str) -> datetime | None:
        try:
            return datetime.fromisoformat(self._read(f"{run_id}.beat"))
        except (OSError, ValueError):
            return None

    @contextmanager
    def heartbeat(self, run_id: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
        """Beat for `run_id` every `every_s` while the block runs, and copy its log (if it changed) to the store
        every LOG_EVERY_BEATS beats, for a console on another pod to follow the run."""
        stop = threading.Event()

        def beat_until_stopped() -> None:
            published_size = -1
            for beats in itertools.count(1):
                try:
                    self.beat(run_id)
                    if beats % LOG_EVERY_BEATS == 0 and (size := self._local_log_size(run_id)) != published_size:
                        self.publish_log(run_id, last_bytes=LOG_TAIL_BYTES)
                        published_size = size
                except OSError as exc:  # a full or flaky store: the run goes on; readers may call it dead
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

    # -- logs ----------------------------------------------------------------------------------------

    def _local_log_size(self, run_id: str) -> int:
        local = self.local_dir / f"{run_id}.log"
        return local.stat().st_size if local.exists() else -1

    def publish_log(self, run_id: str, last_bytes: int | None = None) -> None:
        """Copy the log of a run this machine does into the store beside its record, for any machine to read: the
        whole log, or (while the run works) its last `last_bytes`."""
        local = self.local_dir / f"{run_id}.log"
        if not local.exists() or Path(self._path(local.name)) == local:
            return
        if last_bytes is None:
            self.fs.put_file(str(local), self._path(local.name))
            return
        with local.open("rb") as run_log:
            run_log.seek(max(0, run_log.seek(0, os.SEEK_END) - last_bytes))
            put_whole(self.fs, self._path(local.name), run_log.read(), exclusive=False)

    def read_log(self, run_id: str, last_bytes: int) -> str | None:
        """The last `last_bytes` of a run's log: this machine's own while the run works here, else the store's copy
        (up to 30 s behind while the run works on another pod); None where neither is (a run started with --wait)."""
        local = self.local_dir / f"{run_id}.log"
        fs, path = (LocalFileSystem(), str(local)) if local.exists() else (self.fs, self._path(local.name))
        try:
            with fs.open(path, "rb") as run_log:
                run_log.seek(max(0, run_log.seek(0, os.SEEK_END) - last_bytes))
                return run_log.read().decode("utf-8", "replace")
        except OSError:
            return None

    # -- records -------------------------------------------------------------------------------------

    def save(self, record: RunRecord) -> None:
        name = f"{record.run_id}.json"
        finishing = record.finished_at is not None and not (
            (before := self._record(record.run_id)) is not None and before.finished_at is not None)
        self._write(name, record.model_dump_json(indent=2))
        self._finished.pop(record.run_id, None)
        if finishing:
            self._count_outcome(record)
        if record.finished_at is not None:
            self._forget_old()

    def _count_outcome(self, record: RunRecord) -> None:
        """Verdicts ever, per task: a counter that survives the pruning of old records (for /metrics).

        Each count is a new file, `outcomes/<seq>.json`, created exclusively: two runs finishing at once on two
        pods cannot both write the next one, so the loser reads the winner's counts and adds its own (a store has
        no lock to hold across a read and a write; one small file per finished run, ever, would cost /metrics a
        read of each)."""
        key = (record.task or "-", record.state.value)
        for _ in range(COUNT_ATTEMPTS):
            seq, counts = self._latest_outcomes()
            counts[key] = counts.get(key, 0) + 1
            text = json.dumps([[task, verdict, n] for (task, verdict), n in sorted(counts.items())])
            if create_exclusive(self.fs, self._path(f"outcomes/{seq + 1:010d}.json"), text):
                # the one before stays: a reader that listed before this may still read it
                forget_epochs_before(self.fs, self._path("outcomes"), seq)
                return
        log.warning("event=outcome_not_counted run_id=%s verdict=%s: other runs kept counting first",
                    record.run_id, record.state)

    def _latest_outcomes(self) -> tuple[int, dict[tuple[str, str], int]]:
        """The newest count's number and counts (0, {}: none yet)."""
        for _ in range(COUNT_ATTEMPTS):
            seq = latest_epoch(self.fs, self._path("outcomes"))
            try:
                return seq, {(task, verdict): n for task, verdict, n in
                             json.loads(self._read(f"outcomes/{seq:010d}.json" if seq else LEGACY_OUTCOMES))}
            except FileNotFoundError:
                if seq == 0:
                    return 0, {}
                continue  # forgotten since the listing, under two newer counts: look again
        raise OSError(f"the outcome counts in {self.root} kept changing while read")

    def outcomes(self) -> dict[tuple[str, str], int]:
        """(task, verdict) -> finished runs, ever."""
        return self._latest_outcomes()[1]

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
        """Delete the oldest finished runs' records and logs beyond `keep`."""
        finished = [n for n in self._run_ids() if (r := self._record(n)) is not None and r.finished_at is not None]
        for run_id in finished[:max(0, len(finished) - self.keep)]:
            self._finished.pop(run_id, None)
            for name in (f"{run_id}.json", f"{run_id}.log", f"{run_id}.beat"):
                if self.fs.exists(self._path(name)):
                    self.fs.rm_file(self._path(name))
            (self.local_dir / f"{run_id}.log").unlink(missing_ok=True)

    def _record(self, run_id: str) -> RunRecord | None:
        """The record as its run last wrote it (a copy: callers may change theirs)."""
        if run_id in self._finished:
            return self._finished[run_id].model_copy(deep=True)
        try:
            record = RunRecord.model_validate_json(self._read(f"{run_id}.json"))
        except FileNotFoundError:
            return None
        if record.finished_at is not None:  # /metrics and the console list every run: on S3, a GET each
            self._finished[run_id] = record.model_copy(deep=True)
        return record

    def _judged(self, record: RunRecord) -> RunRecord:
        """`record`, `failed` if it says running but its run is dead: silent too long, or (known at once on its own
        machine) its process gone."""
        if record.state == RunState.RUNNING:
            last = self.last_beat(record.run_id) or record.started_at
            silent_s = (datetime.now(UTC) - last).total_seconds()
            if silent_s > STALE_AFTER_S:
                record.state = RunState.FAILED
                record.message = f"the run died at {record.stage}: no heartbeat for {silent_s:.0f} s"
            elif record.host == socket.gethostname() and not process_alive(record.pid):
                record.state = RunState.FAILED
                record.message = f"the run died at {record.stage}: its process {record.pid} is gone"
        return record

    def get(self, run_id: str) -> RunRecord | None:
        record = self._record(run_id)
        return self._judged(record) if record is not None else None

    def _run_ids(self) -> list[str]:
        """Every recorded run, oldest first (run ids sort by start time)."""
        return [n[:-5] for n in self._names() if n.startswith("run-") and n.endswith(".json")]

    def list(self, limit: int | None = None) -> list[RunRecord]:
        names = self._run_ids()
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
