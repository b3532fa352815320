"""Keeps one curator running whatever the broker does, and says how it is doing.

A broker that is down or unknown when the platform starts, or that goes away later, must never stop
serving: the supervisor builds the curator, runs it, and after any failure (no broker, a version probe
that gets no answer, a crash) waits and tries again, 1 s doubling to a minute. Its state goes to a
small file of its own (several curators may run: partitioned curation) beside the curated dataset, on its
store (`curators/<host>-<pid>.json`): curators on many machines that share no volume report where
`/healthz` on any replica and `flywheel feedback status` look.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

from fsspec import AbstractFileSystem
from pydantic import BaseModel, ValidationError

from feedback.dataset import curated_dataset
from flywheel.config import Settings
from flywheel.runs import process_alive
from flywheel.store import put_whole

log = logging.getLogger("flywheel.feedback.supervisor")

FIRST_RETRY_S, MAX_RETRY_S = 1.0, 60.0
# A live curator writes at least this often (its lag every few seconds; a waiting one at each retry, a minute
# apart at most): one on another host that has been silent for longer is taken as gone.
SILENT_S = 3 * MAX_RETRY_S
FORGET_S = 7 * 86400.0  # a stopped curator's file is removed after this long
HEALTH_FOLDER = "curators"


class CuratorHealth(BaseModel):
    state: Literal["starting", "running", "waiting", "stopped"]
    detail: str = ""  # why it is waiting: the error, without a traceback
    since: float  # unix time of the last change of state
    retries: int = 0  # failures in a row
    pid: int
    host: str = ""  # the node it runs on: only there can the pid be checked
    lag_records: int = 0  # logged but not yet curated, at the last report (every few seconds)
    lag_seconds: float = 0.0  # how far behind the newest event read that is
    updated: float = 0.0  # unix time of its last report


class Runnable(Protocol):
    def run(self, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


def health_store(settings: Settings) -> tuple[AbstractFileSystem, str]:
    """The store and folder the curators report in: `curators/` in the curated dataset's root."""
    dataset = curated_dataset(settings)
    return dataset.fs, dataset.path(HEALTH_FOLDER)


def _own_path(settings: Settings) -> tuple[AbstractFileSystem, str]:
    fs, folder = health_store(settings)
    return fs, f"{folder}/{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}-{os.getpid()}.json"


def _reports(settings: Settings) -> list[tuple[AbstractFileSystem, str, CuratorHealth]]:
    """Every curator's file, as it is on the store now (a cached listing would hide new curators)."""
    fs, folder = health_store(settings)
    fs.invalidate_cache(folder)
    try:
        paths = [p for p in fs.ls(folder, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return []
    found = []
    for path in paths:
        try:
            found.append((fs, path, CuratorHealth.model_validate_json(fs.cat_file(path))))
        except (OSError, ValidationError):
            continue  # removed meanwhile
    return found


def read_curators(settings: Settings) -> list[CuratorHealth]:
    """Each curator's last word, newest first: `stopped` where its process is gone (this host) or it has been
    silent for SILENT_S (another host, where its pid means nothing)."""
    found = [_checked(health) for _, _, health in _reports(settings)]
    return sorted(found, key=lambda h: h.updated, reverse=True)


def _checked(health: CuratorHealth) -> CuratorHealth:
    if health.state == "stopped":
        return health
    if health.host in ("", socket.gethostname()):
        if not process_alive(health.pid):
            return health.model_copy(update={"state": "stopped", "detail": "the process running it is gone"})
    elif time.time() - health.updated > SILENT_S:
        return health.model_copy(update={"state": "stopped",
                                          "detail": f"no report from it for {time.time() - health.updated:.0f}s"})
    return health


def read_health(settings: Settings) -> CuratorHealth | None:
    """Curation as a whole (`overall`). None: no curator ever started."""
    return overall(read_curators(settings))


def overall(curators: list[CuratorHealth]) -> CuratorHealth | None:
    """While any curator runs, the newest running one with every running curator's lag summed (each owns its
    own partitions); else the newest word of one that is starting or waiting; else the last one stopped."""
    running = [h for h in curators if h.state == "running"]
    if running:
        return running[0].model_copy(update={"lag_records": sum(h.lag_records for h in running),
                                             "lag_seconds": max(h.lag_seconds for h in running)})
    return next((h for h in curators if h.state != "stopped"), curators[0] if curators else None)


def _record(settings: Settings, state: str, detail: str = "", retries: int = 0) -> None:
    _write(settings, CuratorHealth(state=state, detail=detail, since=time.time(), retries=retries, pid=os.getpid(),
                                   host=socket.gethostname()))


def _write(settings: Settings, health: CuratorHealth) -> None:
    fs, path = _own_path(settings)
    put_whole(fs, path, health.model_copy(update={"updated": time.time()}).model_dump_json().encode(), exclusive=False)


def _forget_the_gone(settings: Settings) -> None:
    """Remove the files of this host's curators whose process is gone, and of any stopped for FORGET_S."""
    for fs, path, report in _reports(settings):
        health = _checked(report)
        here = health.host in ("", socket.gethostname())
        if health.state == "stopped" and ((here and health.pid != os.getpid())
                                          or time.time() - health.updated > FORGET_S):
            with contextlib.suppress(FileNotFoundError):  # another supervisor removed it first
                fs.rm_file(path)


def report_lag(settings: Settings, records: int, seconds: float) -> None:
    """The running curator's lag; kept beside the supervisor's state (a curator run alone reports too)."""
    fs, path = _own_path(settings)
    try:
        current = CuratorHealth.model_validate_json(fs.cat_file(path))
    except (OSError, ValidationError):  # a curator run alone, without a supervisor
        current = CuratorHealth(state="running", since=time.time(), pid=os.getpid(), host=socket.gethostname())
    _write(settings, current.model_copy(update={"lag_records": records, "lag_seconds": round(seconds, 3)}))


def supervise(settings: Settings, stop: threading.Event, build: Callable[[Settings], Runnable] | None = None) -> None:
    """Run a curator until `stop` is set, rebuilding it after every failure."""
    if build is None:
        from feedback.partitioned import build_curator as build
    retries = 0
    _forget_the_gone(settings)
    _record(settings, "starting")
    while not stop.is_set():
        try:
            curator = build(settings)
        except Exception as exc:  # e.g. no broker to connect to, or no answer to the version probe
            retries += 1
            wait = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (retries - 1))
            where = settings.feedback.kafka_bootstrap or "the local log"
            detail = f"cannot reach the feedback stream at {where}: {type(exc).__name__}: {exc}"[:500]
            log.warning("event=curator_waiting retries=%d retry_in_s=%.0f detail=%r", retries, wait, detail)
            _record(settings, "waiting", detail, retries)
            stop.wait(wait)
            continue
        retries = 0
        _record(settings, "running")
        try:
            curator.run(stop)
        except Exception as exc:  # a bug: restart it rather than lose curation until someone notices
            log.exception("event=curator_crashed")
            _record(settings, "waiting", f"crashed: {type(exc).__name__}: {exc}"[:500], 1)
            stop.wait(FIRST_RETRY_S)
        finally:
            curator.close()
    _record(settings, "stopped")
