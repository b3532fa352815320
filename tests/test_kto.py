"""KTO on thumbs up / thumbs down: class balance, and a short run on the tiny model (no Ray)."""

from collections.abc import Iterator
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from feedback.schemas import CuratedExample
from training.demo_model import build_demo_base
from training.demo_task import generate_examples
from training.kto import KtoExample, balance_kto, train_kto
from training.retrain_data import TrainExample, kto_training_rows
from training.sft import SftConfig, completion_text, train_lora


def rated(desirable: int, undesirable: int) -> list[KtoExample]:
    """Interleaved rows, each prompt naming its index so kept rows can be traced."""
    labels = [True] * desirable + [False] * undesirable
    return [KtoExample(prompt=f"news {i}", completion=f"answer {i}", label=label) for i, label in enumerate(labels)]


def counts(rows: list[KtoExample]) -> tuple[int, int]:
    return sum(r.label for r in rows), sum(not r.label for r in rows)


@pytest.mark.parametrize(
    ("desirable", "undesirable", "kept"),
    [
        (10, 10, (10, 10)),  # 1:1 stays
        (13, 10, (13, 10)),  # 1.3:1 stays
        (14, 10, (13, 10)),  # above 4:3: desirable cut to floor(4/3 * 10)
        (40, 9, (12, 9)),  # exactly 4:3 after the cut
        (30, 3, (4, 3)),
        (5, 10, (5, 5)),  # below 1:1: undesirable cut to match
        (2, 1, (1, 1)),  # 2:1 with one thumbs-down: 4/3 of one rounds down to one
        (1, 1, (1, 1)),
    ],
)
def test_balance_kto_keeps_ratio_between_1_and_4_to_3(desirable: int, undesirable: int, kept: tuple[int, int]) -> None:
    rows = rated(desirable, undesirable)
    balanced = balance_kto(rows, seed=3)
    assert counts(balanced) == kept
    assert 1 <= Fraction(*kept) <= Fraction(4, 3)
    positions = [rows.index(row) for row in balanced]
    assert positions == sorted(positions)  # a subset, in the original order


def test_balance_kto_is_deterministic_per_seed() -> None:
    rows = rated(40, 10)
    assert balance_kto(rows, seed=1) == balance_kto(rows, seed=1)
    assert balance_kto(rows, seed=1) != balance_kto(rows, seed=2)
    assert [r for r in balance_kto(rows, seed=1) if not r.label] == [r for r in rows if not r.label]


@pytest.mark.parametrize(("desirable", "undesirable"), [(5, 0), (0, 5), (0, 0)])
def test_balance_kto_needs_both_sides(desirable: int, undesirable: int) -> None:
    with pytest.raises(ValueError, match=f"got {desirable} desirable and {undesirable} undesirable"):
        balance_kto(rated(desirable, undesirable))


def curated(i: int, **verdict: object) -> CuratedExample:
    now = datetime.now(UTC)
    return CuratedExample(
        event_id=f"e{i}", request_id=f"{i:032x}", task="demo", feedback_ts=now, prediction_ts=now,
        adapter_version="demo-v1", prompt_kind="text", prompt=f"news {i}", answer="positive", reasoning="",
        rating=verdict.get("rating"), thumb=verdict.get("thumb"), correction=verdict.get("correction"), comment=None,
        user_id=None, tenant_id=None, feedback_source="log/0", feedback_offset=i, prediction_source="log/0",
        prediction_offset=i)


def test_kto_rows_leave_out_the_gate_hold_out_and_unrated_rows() -> None:
    rows = [curated(i, thumb="up" if i % 2 else "down") for i in range(10)]
    rows += [curated(10, rating=5), curated(11, rating=2), curated(12, correction="negative")]
    holdout = [TrainExample(prompt="news 1", reasoning="", answer="positive", source="approved"),
               TrainExample(prompt="news 2", reasoning="", answer="positive", source="approved")]
    kept = kto_training_rows(rows, holdout)
    prompts = {k.prompt for k in kept}
    assert not prompts & {"news 1", "news 2"}  # the gate's rows are never trained on
    assert "news 12" not in prompts  # a correction without a rating or thumb is SFT's, not KTO's
    assert {("news 10", True), ("news 11", False)} <= {(k.prompt, k.label) for k in kept}
    assert counts(kept) == (5, 5)
    golden = {k.prompt for k in kto_training_rows(rows, holdout, ["NEWS 3", " news  4 "])}
    assert golden == prompts - {"news 3", "news 4"}  # nor are the golden set's prompts


def test_kto_rows_with_one_kind_of_verdict_are_refused_as_too_little_data() -> None:
    with pytest.raises(ValueError, match="both thumbs up and thumbs down"):
        kto_training_rows([curated(i, thumb="up") for i in range(20)], [])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run far slower with two threads on a busy 2-core box (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny base and an SFT adapter on the drifted task (the adapter KTO continues from)."""
    base = build_demo_base(tmp_path_factory.mktemp("kto") / "base", steps=150, seed=0)
    adapter = base.parent / "champion"
    train_lora(base, generate_examples(64, seed=1, distribution="drifted"), adapter, SftConfig(steps=10))
    return base, adapter


def test_kto_run_changes_the_adapter_and_lowers_its_loss(champion: tuple[Path, Path]) -> None:
    base, init = champion
    news = generate_examples(48, seed=5, distribution="drifted")
    # Thumbs up on the right answer; thumbs down on the next example's answer (wrong cue, often wrong label).
    rows = [
        KtoExample(prompt=ex.prompt, completion=completion_text(ex.reasoning, ex.answer), label=True) for ex in news
    ]
    rows += [
        KtoExample(prompt=ex.prompt, completion=completion_text(other.reasoning, other.answer), label=False)
        for ex, other in zip(news, news[1:] + news[:1], strict=True)
    ]
    lines: list[str] = []
    out = base.parent / "kto"
    config = SftConfig(steps=12, batch_size=8, learning_rate=5e-3)
    result = train_kto(base, rows, out, config, init_adapter=init, progress=lines.append)

    assert result.steps == 12
    # The policy starts equal to its reference (the champion), where the KTO loss is 0.5; measured: 0.40.
    assert result.first_loss == pytest.approx(0.5, abs=1e-3)
    assert result.last_loss < result.first_loss - 0.03
    assert len([line for line in lines if line.startswith("event=train_progress method=kto step=")]) == 12
    before, after = load_file(init / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # only the trained adapter is saved, not TRL's frozen reference copy
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (out / "ref").exists()
