"""What every `flywheel` command shares: the --config and --json options, errors, output.

With --json, stdout holds the JSON and nothing else: while the command runs, whatever else is written to
stdout (a library's import banner, progress bars, Ray's forwarded worker output; Python's `sys.stdout` and
file descriptor 1 alike) goes to stderr, and `emit` writes the JSON to the real stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, NoReturn, TextIO

import click
import typer
from pydantic import ValidationError
from typer.core import TyperCommand

from flywheel.config import Settings, load_settings

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (env FLYWHEEL_* overrides it).",
                 envvar="FLYWHEEL_CONFIG", show_envvar=True),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def settings_or_exit(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ValidationError as exc:  # each field and why, never the values given (a config holds secrets)
        fail("invalid configuration:\n" + "\n".join(
            f"  {'.'.join(map(str, error['loc'])) or '(top level)'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)))
    except (FileNotFoundError, ValueError) as exc:
        fail(f"invalid configuration: {exc}")


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


# Where `emit` writes while a --json command runs: the real stdout, which everything else is kept off.
_json_out: ContextVar[TextIO | None] = ContextVar("flywheel_json_out", default=None)


def emit(as_json: bool, payload: Any, text: str) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str) if as_json else text, file=_json_out.get())


@contextlib.contextmanager
def stdout_for_json() -> Iterator[None]:
    """Everything written to stdout goes to stderr meanwhile, but `emit`'s JSON goes to the real stdout."""
    real = sys.stdout
    real.flush()
    try:
        fd: int | None = real.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's runner): Python's stream alone
        fd = None
    saved = os.dup(fd) if fd is not None else None
    out = os.fdopen(saved, "w", encoding=real.encoding or "utf-8", closefd=False) if saved is not None else real
    token = _json_out.set(out)
    try:
        if fd is not None:
            sys.stderr.flush()
            os.dup2(2, fd)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_out.reset(token)
        out.flush()
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, fd)  # type: ignore[arg-type]
            os.close(saved)


class JsonCommand(TyperCommand):
    """A command whose --json run leaves stdout to the JSON alone (`stdout_for_json`)."""

    def invoke(self, ctx: click.Context) -> Any:
        if not ctx.params.get("as_json"):
            return super().invoke(ctx)
        with stdout_for_json():
            return super().invoke(ctx)


def json_only_on_stdout(app: typer.Typer) -> None:
    """Make every command of `app` and of its command groups a `JsonCommand` (call once, all registered)."""
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # a command with a class of its own keeps it
            command.cls = JsonCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            json_only_on_stdout(group.typer_instance)


def progress(message: str) -> None:
    typer.echo(f"  {message}", err=True)
