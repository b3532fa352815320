"""`flywheel train`'s first adapter serves only when it beats the bare base on the test split (or is forced).

The decision is made on evaluated scores, so these tests hand the trainer its test-split scores and drive the
register step for real (registry, aliases, report) without training; tests/test_train_task.py trains for real
and asserts a first adapter that does beat the base is made champion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flywheel.registry import AdapterManifest, Registry, registry_for
from flywheel.tasks import TaskSpec
from tests.conftest import make_settings
from tests.test_registry import BASE, fake_adapter
from training import train_task
from training.evaluate import SliceScores
from training.train_task import TaskTrainer, TrainReport, TrainRequest
from training.user_data import Example, Splits, Turn

TRIAGE = TaskSpec(name="triage", kind="classification", labels=["urgent", "routine"])


def split_scores(right: int, n: int = 20) -> SliceScores:
    per_example = [1.0] * right + [0.0] * (n - right)
    return SliceScores(n=n, metric="accuracy", score=right / n, per_example=per_example, format_validity=1.0,
                       mean_latency_ms=5.0)


def register_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: int, adapter: int,
                   force: bool = False, meanwhile: Callable[[Registry], None] | None = None,
                   ) -> tuple[TrainReport, TaskTrainer]:
    """`meanwhile`: what another process does to the registry right after this train registers its version."""
    monkeypatch.setattr(train_task, "base_ref", lambda _settings: BASE)  # no base model to fingerprint here
    settings = make_settings(tmp_path / "home")
    trainer = TaskTrainer(settings, TRIAGE, TrainRequest(task="triage", data=tmp_path / "data.jsonl", force=force))
    if meanwhile is not None:
        register = trainer.registry.register

        def register_then_someone_else_moves(*args: Any, **kwargs: Any) -> AdapterManifest:
            manifest = register(*args, **kwargs)
            monkeypatch.setattr(trainer.registry, "register", register)  # the other process registers plainly
            meanwhile(trainer.registry)
            return manifest

        monkeypatch.setattr(trainer.registry, "register", register_then_someone_else_moves)
    trainer.scores = {"base": split_scores(base), "candidate": split_scores(adapter)}
    report = TrainReport(task="triage", data={"splits": {"train": 42, "val": 9, "test": 20}}, evaluation={
        who: s.model_dump(exclude={"per_example"}) for who, s in trainer.scores.items()},
        training={"steps": 240, "planned_steps": 240, "stop_reason": "cap",
                  "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]}})
    test = [Example(messages=[Turn(role="user", content=f"message {i}")], answer="urgent", line=i) for i in range(20)]
    trainer._register(Splits(train=[], val=[], test=test), fake_adapter(tmp_path / "adapter"), report)
    return report, trainer


def test_a_first_adapter_that_does_not_beat_the_base_is_registered_but_not_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a user tried: an adapter at 0.000 on its test split, against a base at 0.000, was made champion."""
    report, trainer = register_first(tmp_path, monkeypatch, base=0, adapter=0)
    registry = registry_for(trainer.settings, "triage")
    assert report.version == "triage-v1" and registry.manifest("triage-v1").status == "ready"
    assert registry.alias("champion") is None and not report.champion and not report.forced
    assert "not champion" in report.message and "does not beat the bare base" in report.message, report.message
    assert report.beats_base is not None and report.beats_base["outcome"] == "failed"
    assert report.beats_base["rows"] == 20
    lines = report.lines()
    assert any("against the base: failed" in line for line in lines)
    # not learned, and what to change: it stopped at the step cap, on little data, with a small adapter
    assert report.learned is False and "NOT LEARNED" in report.message
    assert [a.split(":")[0] for a in report.advice] == ["more steps", "more data", "a larger adapter"]
    assert any(line.startswith("  not learned: ") and "more steps" in line for line in lines), lines
    assert any(line.startswith("  training: 240 of 240 planned steps, stopped by the step cap") for line in lines)
    assert any(line.startswith("  test candidate: accuracy 0.000 on 20 examples") for line in lines), lines


def test_a_first_adapter_that_beats_the_base_is_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report, trainer = register_first(tmp_path, monkeypatch, base=4, adapter=16)
    assert registry_for(trainer.settings, "triage").alias("champion") == "triage-v1"
    assert report.champion and not report.forced and "beats the bare base" in report.message
    assert report.learned and not report.advice


def test_force_makes_a_first_adapter_champion_and_the_report_says_so(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    report, trainer = register_first(tmp_path, monkeypatch, base=0, adapter=0, force=True)
    registry = registry_for(trainer.settings, "triage")
    assert registry.alias("champion") == "triage-v1" and report.champion and report.forced
    assert "forced with --force" in report.message
    assert "forced with --force" in registry.history()[-1].reason


def test_a_champion_promoted_while_the_first_train_ran_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first adapter is promoted only over no champion: one that another process made meanwhile stays."""
    def another_first_adapter(registry: Registry) -> None:
        other = registry.register(fake_adapter(tmp_path / "other", b"other"), base=BASE)
        registry.promote(other.version, actor="someone else")

    report, trainer = register_first(tmp_path, monkeypatch, base=4, adapter=16, meanwhile=another_first_adapter)
    registry = registry_for(trainer.settings, "triage")
    assert registry.alias("champion") == "triage-v2" and report.version == "triage-v1" and not report.champion
    assert "not champion" in report.message and "triage-v2" in report.message, report.message
