"""Which policy a retrain judges by, and what it asks before it spends a training run (no Ray, no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback.dataset import CuratedDataset, Manifest, PartFile
from flywheel.config import Settings
from flywheel.registry import registry_for
from flywheel.runs import RunRecord, RunState
from tests.test_registry import BASE, fake_adapter
from tests.test_trust import T0, learnable, row
from training.pipeline import Retrain
from training.retrain_data import TrainExample, build_retrain_data, confirmed_batch


@pytest.mark.parametrize(("prompts", "golden", "why"), [
    (3, False, "--eval-file"),  # no golden set: nothing shows the candidate regresses nowhere else
    (2, True, "retrain.min_confirmed_prompts"),  # two prompts, each confirmed by two keys
    (3, True, "rated well"),  # no answer of the champion rated well: nothing to keep
], ids=["no-golden-set", "too-few-prompts", "no-well-rated-answers"])
def test_a_small_data_retrain_that_could_not_be_judged_stops_before_training(
    tmp_path: Path, prompts: int, golden: bool, why: str,
) -> None:
    settings = Settings(home=tmp_path, tasks=[{"name": "faq", "kind": "generation", "metric": "token_f1"}])
    rows = [row(f"k{k}", prompt=f"question {p}", correction=f"answer {p}", at=10 * p + k)
            for p in range(prompts) for k in range(2)]
    if why != "rated well":
        rows.append(row("k9", prompt="a question users liked", rating=5, at=100))
    dataset = CuratedDataset(settings.feedback_dir / "dataset")
    part = "day=2026-12-01/part-0000000001-000.parquet"
    dataset.write_part(part, rows)
    dataset.write_manifest(Manifest(updated_at=T0, files=[PartFile(
        path=part, day="2026-12-01", batch=1, rows=len(rows), offsets={}, positions={}, created_at=T0)]))
    registry = registry_for(settings, "faq")
    registry.promote(registry.register(fake_adapter(tmp_path / "adapter"), base=BASE).version, actor="test")
    if golden:
        registry.save_golden('{"messages": [{"role": "user", "content": "hello"}], "answer": "hi"}\n')

    done = Retrain(settings, RunRecord(run_id="run-1", task="faq", trigger="test")).run()
    assert done.state == RunState.INSUFFICIENT_DATA and why in done.message, done.message
    assert done.dataset["policy"] == "confirmed_corrections" and done.dataset["confirmed"] == prompts
    assert done.stage == "dataset" and done.version is None  # nothing trained, nothing registered
    assert [m.version for m in registry.versions()] == ["faq-v1"]


def test_a_corrections_batch_replays_none_of_the_answers_users_corrected_away() -> None:
    """The champion learned `Billing, then Cancel.` for three phrasings; users corrected one of them. Replaying
    the other two would teach the old answer back: they are left out, the rest of the replay keeps its weight
    (repeated when the pool is small), and a classification label is never left out."""
    old, new = "Billing, then Cancel.", "Help, then 01."
    phrasings = ["How do I cancel my plan?", "What is the way to cancel my plan?", "Can you cancel my plan?"]
    champion = [TrainExample(prompt=p, reasoning="", answer=old, source="dataset") for p in phrasings]
    champion += [TrainExample(prompt=f"How do I {q}?", reasoning="", answer=a, source="dataset")
                 for q, a in [("export my data", "Account, then Export."), ("mute alerts", "Alerts, then Mute.")]]
    items = learnable([row(f"k{k}", prompt=phrasings[0], correction=new, at=k) for k in range(3)])
    data = build_retrain_data(items, champion, holdout_fraction=0.0, replay_fraction=0.0)
    assert [(e.prompt, e.answer, e.replaces) for e in data.confirmed] == [(phrasings[0], new, "Call us.")]

    batch = confirmed_batch(data, champion, replay_per_row=2, generation=True)
    assert [e.answer for e in batch if e.source == "correction"] == [new] * 3  # one row per agreeing rater
    replayed = [e for e in batch if e.source == "replay"]
    assert len(replayed) == 6 and {e.answer for e in replayed} == {"Account, then Export.", "Alerts, then Mute."}

    labels = confirmed_batch(data, champion, replay_per_row=2, generation=False)
    assert old in {e.answer for e in labels if e.source == "replay"}
