"""What every `flywheel` command shares: the --config and --json options, errors, output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

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


def emit(as_json: bool, payload: Any, text: str) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str) if as_json else text)


def progress(message: str) -> None:
    typer.echo(f"  {message}", err=True)
