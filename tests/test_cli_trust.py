"""The trust commands as an operator types them (`flywheel feedback retract`, `keys`, `lineage`, `users forget`),
through typer's CliRunner on a scratch home and registry named by a flywheel.yaml in tmp_path. No retrain runs:
what would be launched is recorded instead."""

from __future__ import annotations

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
