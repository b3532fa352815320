"""The `flywheel` command line as a script would use it (JSON out, exit codes, clear errors)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.cli import StopSignals, app


def run_json(cli: CliRunner, *args: str) -> object:
    result = cli.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_command_has_help(cli: CliRunner) -> None:
    for command in ([], ["bootstrap"], ["up"], ["adapters", "list"], ["promote"], ["rollback"], ["status"],
                    ["bench", "serve"]):
        result = cli.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.stdout, command


def test_bootstrap_is_idempotent(cli: CliRunner) -> None:
    result = run_json(cli, "bootstrap")
    assert result == {"base_model": result["base_model"], "base_built": False, "champion": "demo-v1",
                      "adapter_registered": False}


def test_list_promote_status_rollback(cli: CliRunner) -> None:
    rows = run_json(cli, "adapters", "list")
    assert [(r["version"], r["aliases"]) for r in rows] == [("demo-v1", ["champion"]), ("demo-v2", [])]

    moved = run_json(cli, "promote", "demo-v2", "--reason", "better on drifted news")
    assert (moved["previous"], moved["version"], moved["reason"]) == ("demo-v1", "demo-v2",
                                                                       "better on drifted news")
    status = run_json(cli, "status")
    assert status["champion"] == "demo-v2"
    assert status["history"][-1]["action"] == "promote"

    back = run_json(cli, "rollback")
    assert back["version"] == "demo-v1" and back["action"] == "rollback"
    assert run_json(cli, "status")["champion"] == "demo-v1"


def test_clear_errors_and_exit_codes(cli: CliRunner, tmp_path: Path) -> None:
    unknown = cli.invoke(app, ["promote", "demo-v9"])
    assert unknown.exit_code == 1 and "demo-v9" in unknown.stderr and "not in the registry" in unknown.stderr

    nothing = cli.invoke(app, ["rollback"])
    assert nothing.exit_code == 1 and "nothing to roll back" in nothing.stderr

    missing = cli.invoke(app, ["status", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "config file not found" in missing.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("serving:\n  engine: tensorflow\n")
    invalid = cli.invoke(app, ["status", "--config", str(bad)])
    assert invalid.exit_code == 1 and "serving.engine" in invalid.stderr


def test_a_repeated_stop_signal_never_cuts_the_cleanup_short_and_a_third_forces_an_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = StopSignals()
    with pytest.raises(KeyboardInterrupt):  # the first stops serving, as Ctrl-C does
        stop.on_signal(signal.SIGTERM, None)
    stop.on_signal(signal.SIGTERM, None)  # the second arrives during the cleanup: it goes on
    assert exits == []
    stop.on_signal(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]

    already = StopSignals()
    already.stopping = True  # the cleanup began another way (Ctrl-C, a failed start)
    already.on_signal(signal.SIGTERM, None)
    assert already.received == 1
