"""Structured, one-event-per-line logging for every flywheel process (CLI, replicas, workers)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import os
import queue
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, TextIO

REQUEST_LOGGER = "flywheel.requests"  # one line per request served: its own destination (`serving.request_log`)
REQUEST_LOG_BYTES = 64 * 2**20


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is now (test runners swap and close it)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send `flywheel.*` loggers to stderr as `time level logger key=value…` lines, once per process."""
    logger = logging.getLogger("flywheel")
    if logger.handlers:
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def configure_request_log(mode: Literal["file", "stderr", "off"], directory: Path) -> None:
    """Route `flywheel.requests` once per process: to a rotated file of this process's own, written by a
    background thread (a request only enqueues its line); to stderr with the other logs; or nowhere."""
    logger = logging.getLogger(REQUEST_LOGGER)
    if getattr(logger, "flywheel_configured", False):
        return
    logger.flywheel_configured = True  # type: ignore[attr-defined]
    if mode == "stderr":
        return  # a child of `flywheel`: its lines go where those go
    logger.propagate = False
    if mode == "off":
        logger.disabled = True
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        writer = logging.handlers.RotatingFileHandler(
            directory / f"requests-{socket.gethostname()}-{os.getpid()}.log", maxBytes=REQUEST_LOG_BYTES,
            backupCount=3, encoding="utf-8")
    except OSError as exc:  # a read-only or full home must not keep a replica from serving
        logger.propagate = True
        logging.getLogger("flywheel").warning("event=request_log_unwritable dir=%s error=%r: request lines go to "
                                              "stderr", directory, exc)
        return
    writer.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(lines, writer)
    listener.start()
    atexit.register(listener.stop)  # writes what is queued before the process ends
    logger.addHandler(logging.handlers.QueueHandler(lines))


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for our --json: GPTQModel prints its banner and progress bars there, Ray its workers' logs."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
