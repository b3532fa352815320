"""Structured, one-event-per-line logging for every flywheel process (CLI, replicas, workers)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int = logging.INFO) -> None:
    """Send `flywheel.*` loggers to stderr as `time level logger key=value…` lines, once per process."""
    logger = logging.getLogger("flywheel")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
