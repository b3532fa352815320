"""`flywheel feedback curator|status|export` (and `flywheel curator`): the feedback plane's commands.

Mounted by flywheel/cli.py. The option types and the three helpers mirror flywheel/cli.py's instead of
importing them, because flywheel/cli.py imports this module (the import would be circular).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from kafka.errors import KafkaError

from feedback.curator import Curator, dataset_path, feedback_status
from feedback.dataset import CuratedDataset
from flywheel.config import Settings, load_settings
from flywheel.logs import configure_logging

app = typer.Typer(help="The feedback plane: curator, stream status, dataset export.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (env FLYWHEEL_* overrides it).",
                 envvar="FLYWHEEL_CONFIG", show_envvar=True),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"invalid configuration: {exc}")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _emit(as_json: bool, payload: Any, text: str) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str) if as_json else text)


@app.command()
def curator(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Curate what is there now, then exit.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Join feedback to its prediction, mask PII, append to the dataset. Runs until Ctrl-C / SIGTERM."""
    configure_logging()
    settings = _settings(config)
    try:
        worker = Curator(settings)
    except (KafkaError, OSError, ValueError) as exc:
        _fail(f"the curator could not start: {exc!r}")
    try:
        if once:
            result = worker.drain()
            _emit(as_json, result.model_dump(mode="json"),
                  f"curated {result.curated} rows from {result.records} records "
                  f"({result.duplicates} duplicates dropped, {result.unmatched} waiting for their prediction)")
            return
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        typer.echo("curator running (Ctrl-C stops after the current batch)", err=True)
        worker.run(stop)
    except TimeoutError as exc:
        _fail(str(exc))
    finally:
        worker.close()


@app.command()
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Received, curated, unmatched (and how old), duplicates, spooled, and the curator's positions."""
    report = feedback_status(_settings(config))
    age = "" if report.unmatched_oldest_age_s is None else f" (oldest {report.unmatched_oldest_age_s:.0f} s)"
    lines = [
        f"backend: {report.backend}",
        f"received {report.received}  curated {report.curated}  unmatched {report.unmatched}{age}  "
        f"duplicates {report.duplicates}  rejected {report.rejected}  spooled {report.spooled}",
        "positions: " + (" ".join(f"{p}={n}" + (f"/{report.log_end[p]}" if p in report.log_end else "")
                                  for p, n in sorted(report.positions.items())) or "-"),
        f"dataset: {report.dataset} ({report.parts} parts)",
    ]
    _emit(as_json, report.model_dump(mode="json"), "\n".join(lines))


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="JSON-lines file to write (PII already masked).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write the curated dataset (every part the manifest names) as JSON lines."""
    dataset = CuratedDataset(dataset_path(_settings(config)))
    try:
        rows = dataset.export_jsonl(out)
    except OSError as exc:
        _fail(f"could not write {out}: {exc}")
    _emit(as_json, {"rows": rows, "out": str(out)}, f"exported {rows} rows to {out}")


if __name__ == "__main__":
    app()
