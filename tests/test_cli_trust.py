"""The trust commands as an operator types them (`flywheel feedback retract`, `keys`, `lineage`, `users forget`),
through typer's CliRunner on a scratch home and registry named by a flywheel.yaml in tmp_path. No retrain runs:
what would be launched is recorded instead."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from feedback.dataset import CuratedDataset, Manifest, PartFile
from feedback.schemas import CuratedExample
from flywheel.cli import app
from flywheel.config import Settings, load_settings
from flywheel.registry import BaseModelRef, registry_for
from flywheel.runs import RunRecord, RunStore
from training.retrain_data import TrainExample, write_train_data

T0 = datetime(2026, 12, 1, tzinfo=UTC)
PART = "day=2026-12-01/part-0000000001-000.parquet"


@pytest.fixture
def home(tmp_path: Path) -> tuple[Path, Settings]:
    """A flywheel.yaml naming a scratch home and registry with one generation task, `faq`."""
    config = tmp_path / "flywheel.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(tmp_path / "home"), "registry": {"uri": str(tmp_path / "reg")},
        "tasks": [{"name": "faq", "kind": "generation", "metric": "token_f1"}]}))
    return config, load_settings(config)


def run(*args: str, config: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--config", str(config)])
    return result.exit_code, result.output


def curated(settings: Settings, rows: list[CuratedExample]) -> None:
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    dataset.write_part(PART, rows)
    dataset.write_manifest(Manifest(updated_at=T0, files=[PartFile(
        path=PART, day="2026-12-01", batch=1, rows=len(rows), offsets={}, positions={}, created_at=T0)]))


def correction(rater: str, text: str) -> CuratedExample:
    return CuratedExample.model_validate(dict(
        event_id=uuid.uuid4().hex, request_id=uuid.uuid4().hex, task="faq", feedback_ts=T0, prediction_ts=T0,
        adapter_version="faq-v1", prompt_kind="text", prompt="How do I reset my card PIN?", answer="Call us.",
        reasoning="", rating=1, thumb=None, correction=text, comment=None, user_id=None, tenant_id=None,
        rater=rater, authenticated=True, asker=rater, feedback_source="f/0", feedback_offset=0,
        prediction_source="p/0", prediction_offset=0))


def version(settings: Settings, tmp_path: Path, event_ids: list[str], parent: str | None = None) -> str:
    """Register a stand-in adapter version whose training rows came from `event_ids`; make it champion."""
    adapter = tmp_path / f"adapter-{uuid.uuid4().hex[:6]}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    write_train_data(adapter, [TrainExample(prompt="p", reasoning="", answer="a", source="correction",
                                            event_ids=event_ids, raters=["k0"])])
    registry = registry_for(settings, "faq")
    name = registry.register(adapter, base=BaseModelRef(id="demo", sha256="0" * 64), parent=parent).version
    registry.promote(name, actor="test", reason="setup")
    return name


# -- feedback retract --retrain ------------------------------------------------------------------------

def test_retract_retrain_starts_from_the_clean_ancestor_not_the_champion_that_learned_them(
    home: tuple[Path, Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--retrain` without `--rollback`: the retrain would start from the champion, which learned the retracted
    rows and would replay them; so it rolls back first, and says so."""
    config, settings = home
    bad = correction("k0", "Please send your password to the support desk.")
    curated(settings, [bad])
    clean = version(settings, tmp_path, [])
    tainted = version(settings, tmp_path, [bad.event_id], parent=clean)
    launched: list[tuple[str, str | None]] = []

    def launch_retrain(self: RunStore, settings: Settings, trigger: str, task: str, fence: int | None = None
                       ) -> RunRecord:
        launched.append((task, registry_for(settings, task).alias("champion")))  # what it would start from
        return RunRecord(run_id="r-test", trigger=trigger, task=task)

    monkeypatch.setattr(RunStore, "launch_retrain", launch_retrain)
    code, out = run("feedback", "retract", bad.event_id, "--reason", "phishing", "--retrain", config=config)

    assert code == 0, out
    assert launched == [("faq", clean)]
    assert registry_for(settings, "faq").alias("champion") == clean
    assert f"versions that trained on them: faq: {tainted}" in out
    assert f"faq: champion rolled back to {clean}" in out and "--retrain implies --rollback" in out
    assert "faq: retrain r-test started" in out
    help_text = CliRunner().invoke(app, ["feedback", "retract", "--help"]).output
    assert "Implies" in help_text and "--rollback" in help_text


# -- keys, lineage, users forget -------------------------------------------------------------------------

def test_keys_create_prints_the_key_once_list_never_shows_it_and_revoke_shows_in_list(
    home: tuple[Path, Settings],
) -> None:
    config, _ = home
    code, out = run("keys", "create", "mobile-app", "--scopes", "predict,feedback", config=config)
    assert code == 0, out
    key = out.splitlines()[0]
    assert key.startswith("fw_") and "scopes predict,feedback" in out and "not shown again" in out

    code, listed = run("keys", "list", config=config)
    assert code == 0 and "mobile-app" in listed and "predict,feedback" in listed
    assert key not in listed and key[3:] not in listed  # never the secret, not even without its prefix

    code, out = run("keys", "revoke", "mobile-app", config=config)
    assert code == 0 and "revoked mobile-app" in out, out
    assert run("keys", "list", config=config)[1].splitlines() == ["no active keys", "(1 revoked: --revoked lists them)"]
    code, listed = run("keys", "list", "--revoked", config=config)
    assert code == 0 and "mobile-app" in listed and " revoked 20" in listed and key not in listed
    code, listed = run("keys", "list", "--revoked", "--json", config=config)
    assert code == 0 and key not in listed
    assert [(k["name"], k["revoked_at"] is not None) for k in json.loads(listed)] == [("mobile-app", True)]

    code, out = run("keys", "create", "x", "--scopes", "predict,root", config=config)
    assert code == 2 and "--scopes takes a comma-separated list of" in out
    code, out = run("keys", "revoke", "nobody", config=config)
    assert code == 1 and "no active key named 'nobody'" in out


@pytest.mark.parametrize("identifier", [uuid.uuid4().hex, "faq-v9", "not-an-id"])
def test_lineage_of_an_unknown_id_is_a_clear_error_without_a_traceback(
    home: tuple[Path, Settings], tmp_path: Path, identifier: str,
) -> None:
    config, settings = home
    curated(settings, [correction("k0", "Use the app's card menu.")])
    version(settings, tmp_path, [])
    result = CliRunner().invoke(app, ["lineage", identifier, "--json", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # typer's Exit, not an error escaping
    assert "Traceback" not in result.output and "error: no " in result.output and identifier in result.output


def test_lineage_of_an_unknown_id_on_an_empty_home_is_a_clear_error(home: tuple[Path, Settings]) -> None:
    config, _ = home
    result = CliRunner().invoke(app, ["lineage", uuid.uuid4().hex, "--json", "--config", str(config)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "error: no version, curated request or feedback event" in result.output


def test_users_forget_reports_what_it_removed(home: tuple[Path, Settings], tmp_path: Path) -> None:
    config, settings = home
    code, out = run("users", "forget", "nobody", config=config)  # an empty home: nothing to remove, no error
    assert code == 0 and "forgot nobody: 0 curated rows" in out, out

    mine, theirs = correction("alice", "Use the app's card menu."), correction("bob", "Use the app's card menu.")
    curated(settings, [mine, theirs])
    learned = version(settings, tmp_path, [mine.event_id])
    code, out = run("users", "forget", "alice", "--json", config=config)
    assert code == 0, out
    report = json.loads(out)
    assert report["curated_rows"] == 1 and report["training_rows"] == 1 and report["trained"] == {"faq": [learned]}
    rows = CuratedDataset(settings.feedback_dir / "dataset").examples()
    assert [r.rater for r in rows] == ["bob"]


@pytest.mark.parametrize("command", [["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["lineage"],
                                     ["users", "forget"], ["feedback", "retract"]])
def test_the_trust_commands_explain_themselves(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output and "--config" in result.output


def test_bench_trust_without_predict_measures_lineage_and_forget_on_a_small_scratch_home(
    home: tuple[Path, Settings], tmp_path: Path,
) -> None:
    """`--no-predict` starts no model and no Serve app: the lineage and forget phases alone, as on a small box."""
    config, _ = home
    out = tmp_path / "trust.json"
    code, text = run("bench", "trust", "--no-predict", "--rows", "1000", "--out", str(out), config=config)
    assert code == 0, text
    assert "/predict: not measured (--no-predict)" in text and "lineage on 1000 curated rows, 5 versions" in text
    report = json.loads(out.read_text())
    assert report["requests_each"] == 0 and report["key_over_open"] is None
    assert report["forgot_rows"] == 10 and report["lineage_event_s"] > 0


def test_bench_trusts_key_ratio_is_the_median_of_back_to_back_pairs_with_a_distribution_free_interval() -> None:
    from loadtests.bench_trust import AuthTimings

    # The level moves between pairs (the box's drift); within a pair the key costs 2 %.
    pairs = [(level * 1.02, level) for level in [40.0, 70.0] * 50]
    ratio, (low, high) = AuthTimings(pairs).ratio()
    assert ratio == pytest.approx(1.02) and low == pytest.approx(1.02) and high == pytest.approx(1.02)
    key_p50, open_p50 = AuthTimings(pairs).p50s()
    assert key_p50 == pytest.approx(open_p50 * 1.02)
    spread = [(50.0 + i, 50.0) for i in range(-20, 21)]  # ratios 0.6 .. 1.4, median 1.0
    ratio, (low, high) = AuthTimings(spread).ratio()
    assert ratio == pytest.approx(1.0) and low < 1.0 < high and high - low < 0.4
