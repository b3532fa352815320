"""Turn curated feedback into a retrain dataset: what to learn from, what to hold out, what to replay.

- Targets: a user's correction first; else an answer rated >= 4 (or thumbs up) as self-distillation.
  A poorly rated answer without a correction is never a target.
- Time-ordered split: the newest `holdout_fraction` is held out for the gate (it is the traffic the
  candidate must be better on); exact duplicates are removed before the split.
- Replay: a share of the champion's own training data, so the candidate does not forget.
- Confirmed corrections: a prompt corrected at least `confirm_repeats` times, every time with the same
  answer, is strong evidence even when there are few such prompts. They are listed apart so the
  retrain can learn a small, focused batch (the pipeline's small-data policy) instead of starving it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from feedback.schemas import CuratedExample
from flywheel.r1 import split_reasoning
from training.kto import KtoExample, balance_kto

TRAIN_DATA_FILE = "train_data.jsonl"  # stored in each adapter version: what it learned from


class TrainExample(BaseModel):
    prompt: str
    reasoning: str
    answer: str
    source: Literal["correction", "approved", "replay", "bootstrap", "dataset"]
    at: datetime | None = None


class RetrainData(BaseModel):
    train: list[TrainExample]
    holdout: list[TrainExample]
    replay: int
    feedback_rows: int
    usable: int
    duplicates: int
    confirmed: list[TrainExample] = Field(
        default_factory=list, description="Prompts whose repeated corrections all agree (one row each, newest)."
    )
    confirmations: dict[str, int] = Field(default_factory=dict, description="Prompt -> agreeing corrections.")


def _prompt_text(row: CuratedExample) -> str:
    if row.prompt_kind == "text":
        return row.prompt
    messages = json.loads(row.prompt)
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def target_of(row: CuratedExample) -> TrainExample | None:
    """The answer the model should have given, or None when the feedback teaches no target."""
    prompt = _prompt_text(row)
    if row.correction:
        reasoning, answer = split_reasoning(row.correction) if "</think>" in row.correction else ("", row.correction)
        return TrainExample(prompt=prompt, reasoning=reasoning, answer=answer.strip(), source="correction",
                            at=row.feedback_ts)
    if (row.rating is not None and row.rating >= 4) or row.thumb == "up":
        return TrainExample(prompt=prompt, reasoning=row.reasoning, answer=row.answer, source="approved",
                            at=row.feedback_ts)
    return None


def kto_example(row: CuratedExample) -> KtoExample | None:
    """Unpaired thumbs for KTO: the served answer, labelled desirable or not."""
    if row.thumb is None and row.rating is None:
        return None
    good = row.thumb == "up" if row.thumb is not None else (row.rating or 0) >= 4
    completion = f"{row.reasoning}\n</think>\n\n{row.answer}"
    return KtoExample(prompt=_prompt_text(row), completion=completion, label=good)


def kto_training_rows(rows: Sequence[CuratedExample], holdout: Sequence[TrainExample]) -> list[KtoExample]:
    """KTO's rows: every rated answer except those of prompts held out for the gate, balanced up/down.

    ValueError when only one kind of verdict is left (all thumbs up, say): KTO has nothing to contrast.
    """
    held_out = {e.prompt for e in holdout}
    return balance_kto([k for k in map(kto_example, rows) if k is not None and k.prompt not in held_out])


def read_train_data(adapter_dir: Path) -> list[TrainExample]:
    path = adapter_dir / TRAIN_DATA_FILE
    if not path.exists():
        return []
    return [TrainExample.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def write_train_data(adapter_dir: Path, examples: Sequence[TrainExample]) -> None:
    (adapter_dir / TRAIN_DATA_FILE).write_text("".join(e.model_dump_json() + "\n" for e in examples))


def _agreeing_corrections(targets: Sequence[TrainExample]) -> dict[str, int]:
    """Prompt -> number of corrections, for prompts whose corrections all give the same answer."""
    answers: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for t in targets:
        if t.source == "correction":
            answers.setdefault(t.prompt, set()).add(" ".join(t.answer.split()).casefold())
            counts[t.prompt] = counts.get(t.prompt, 0) + 1
    return {prompt: n for prompt, n in counts.items() if len(answers[prompt]) == 1}


def build_retrain_data(
    rows: Sequence[CuratedExample],
    champion_data: Sequence[TrainExample],
    *,
    holdout_fraction: float,
    replay_fraction: float,
    confirm_repeats: int = 2,
    seed: int = 0,
) -> RetrainData:
    targets = [t for t in (target_of(r) for r in sorted(rows, key=lambda r: r.feedback_ts)) if t is not None]
    agreeing = _agreeing_corrections(targets)
    # A correction beats an approval of the same prompt: keep one target per prompt, corrections first,
    # the newest of each kind.
    by_prompt: dict[str, TrainExample] = {}
    for example in targets:
        current = by_prompt.get(example.prompt)
        if current is None or example.source == "correction" or current.source != "correction":
            by_prompt[example.prompt] = example
    unique = sorted(by_prompt.values(), key=lambda e: e.at or datetime.min)
    cut = len(unique) - max(1, round(len(unique) * holdout_fraction)) if unique else 0
    train, holdout = unique[:cut], unique[cut:]
    replay_count = round(len(train) * replay_fraction / (1 - replay_fraction)) if train else 0
    pool = [e for e in champion_data if e.prompt not in by_prompt]
    replay = random.Random(seed).sample(pool, min(replay_count, len(pool)))
    replayed = [e.model_copy(update={"source": "replay"}) for e in replay]
    confirmed = [e for e in unique if agreeing.get(e.prompt, 0) >= confirm_repeats]
    return RetrainData(
        train=train + replayed,
        holdout=holdout,
        replay=len(replayed),
        feedback_rows=len(rows),
        usable=len(targets),
        duplicates=len(targets) - len(unique),
        confirmed=confirmed,
        confirmations={e.prompt: agreeing[e.prompt] for e in confirmed},
    )


def confirmed_batch(
    data: RetrainData, champion_data: Sequence[TrainExample], *, replay_per_row: int, seed: int = 0
) -> list[TrainExample]:
    """Training rows for the small-data policy: every confirmed correction, weighted by its agreeing
    repeats, plus a replay of the champion's own data large enough that the rest is not forgotten."""
    weighted = [e for e in data.confirmed for _ in range(data.confirmations[e.prompt])]
    confirmed_prompts = {e.prompt for e in data.confirmed}
    pool = [e for e in champion_data if e.prompt not in confirmed_prompts]
    replay = random.Random(seed).sample(pool, min(len(weighted) * replay_per_row, len(pool)))
    return weighted + [e.model_copy(update={"source": "replay"}) for e in replay]
