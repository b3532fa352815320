"""`flywheel feedback curator|status|export` (and `flywheel curator`): the feedback plane's commands.

Mounted by flywheel/cli.py; the shared options and helpers come from flywheel/cli_common.py.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from kafka.errors import KafkaError

from feedback.curator import Curator, dataset_path, feedback_status
from feedback.dataset import CuratedDataset
from feedback.supervisor import CuratorHealth, supervise
from flywheel.cli_common import ConfigOption, JsonOption, emit, fail, settings_or_exit
from flywheel.logs import configure_logging

app = typer.Typer(help="The feedback plane: curator, stream status, dataset export.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

@app.command()
def curator(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Curate what is there now, then exit.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Join feedback to its prediction, mask PII, append to the dataset. Runs until Ctrl-C / SIGTERM,
    waiting and retrying while the broker cannot be reached (see `flywheel feedback status`)."""
    configure_logging()
    settings = settings_or_exit(config)
    if not once:
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        typer.echo("curator running (Ctrl-C stops after the current batch)", err=True)
        supervise(settings, stop)
        return
    try:
        worker = Curator(settings)
    except (KafkaError, OSError, ValueError) as exc:
        fail(f"the curator could not start: {exc!r}")
    try:
        result = worker.drain()
    except TimeoutError as exc:
        fail(str(exc))
    finally:
        worker.close()
    emit(as_json, result.model_dump(mode="json"),
         f"curated {result.curated} rows from {result.records} records "
         f"({result.duplicates} duplicates dropped, {result.unmatched} waiting for their prediction)")


@app.command()
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Received, curated, unmatched (and how old), duplicates, spooled, and the curator's positions."""
    report = feedback_status(settings_or_exit(config))
    age = "" if report.unmatched_oldest_age_s is None else f" (oldest {report.unmatched_oldest_age_s:.0f} s)"
    age += f" ({report.unmatched_dropped} dropped)" if report.unmatched_dropped else ""
    lines = [
        f"backend: {report.backend}",
        f"received {report.received}  curated {report.curated}  unmatched {report.unmatched}{age}  "
        f"duplicates {report.duplicates}  rejected {report.rejected}  spooled {report.spooled}",
        "positions: " + (" ".join(f"{p}={n}" + (f"/{report.log_end[p]}" if p in report.log_end else "")
                                  for p, n in sorted(report.positions.items())) or "-"),
        f"dataset: {report.dataset} ({report.parts} parts)",
        f"curator: {_describe(report.curator)}",
        "on disk: " + "  ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in report.disk_bytes.items()),
    ]
    emit(as_json, report.model_dump(mode="json"), "\n".join(lines))


def _describe(health: CuratorHealth | None) -> str:
    if health is None:
        return "never started here"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(health.since))
    return f"{health.state} since {since}" + (f" (try {health.retries}: {health.detail})" if health.detail else "")


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="JSON-lines file to write (PII already masked).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write the curated dataset (every part the manifest names) as JSON lines."""
    dataset = CuratedDataset(dataset_path(settings_or_exit(config)))
    try:
        rows = dataset.export_jsonl(out)
    except OSError as exc:
        fail(f"could not write {out}: {exc}")
    emit(as_json, {"rows": rows, "out": str(out)}, f"exported {rows} rows to {out}")


if __name__ == "__main__":
    app()
