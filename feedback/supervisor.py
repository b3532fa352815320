"""Keeps one curator running whatever the broker does, and says how it is doing.

A broker that is down or unknown when the platform starts, or that goes away later, must never stop
serving: the supervisor builds the curator, runs it, and after any failure (no broker, a version probe
that gets no answer, a crash) waits and tries again, 1 s doubling to a minute. Its state goes to a
small file beside the curator's database, which `/healthz` and `flywheel feedback status` read.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ValidationError

from flywheel.config import Settings
from flywheel.runs import process_alive

log = logging.getLogger("flywheel.feedback.supervisor")

FIRST_RETRY_S, MAX_RETRY_S = 1.0, 60.0


class CuratorHealth(BaseModel):
    state: Literal["starting", "running", "waiting", "stopped"]
    detail: str = ""  # why it is waiting: the error, without a traceback
    since: float  # unix time of the last change of state
    retries: int = 0  # failures in a row
    pid: int
    host: str = ""  # the node it runs on: only there can the pid be checked
    lag_records: int = 0  # logged but not yet curated, at the last report (every few seconds)
    lag_seconds: float = 0.0  # how far behind the newest event read that is


class Runnable(Protocol):
    def run(self, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


def health_path(settings: Settings) -> Path:
    return settings.feedback_dir / "curator" / "health.json"


def read_health(settings: Settings) -> CuratorHealth | None:
    """The supervisor's last word; `stopped` if the process that wrote it is gone. None: never started."""
    try:
        health = CuratorHealth.model_validate_json(health_path(settings).read_text())
    except (OSError, ValidationError):
        return None
    here = health.host in ("", socket.gethostname())
    if health.state != "stopped" and here and not process_alive(health.pid):
        return health.model_copy(update={"state": "stopped", "detail": "the process running it is gone"})
    return health


def _record(settings: Settings, state: str, detail: str = "", retries: int = 0) -> None:
    _write(settings, CuratorHealth(state=state, detail=detail, since=time.time(), retries=retries, pid=os.getpid(),
                                   host=socket.gethostname()))


def _write(settings: Settings, health: CuratorHealth) -> None:
    path = health_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(health.model_dump()))
    os.replace(tmp, path)


def report_lag(settings: Settings, records: int, seconds: float) -> None:
    """The running curator's lag; kept beside the supervisor's state (a curator run alone reports too)."""
    current = read_health(settings)
    if current is None or current.pid != os.getpid():
        current = CuratorHealth(state="running", since=time.time(), pid=os.getpid(), host=socket.gethostname())
    _write(settings, current.model_copy(update={"lag_records": records, "lag_seconds": round(seconds, 3)}))


def supervise(settings: Settings, stop: threading.Event, build: Callable[[Settings], Runnable] | None = None) -> None:
    """Run a curator until `stop` is set, rebuilding it after every failure."""
    if build is None:
        from feedback.partitioned import build_curator as build
    retries = 0
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
