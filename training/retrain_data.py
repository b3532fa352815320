"""Turn curated feedback into a retrain dataset: what to learn from, what to hold out, what to replay.

- Targets: a user's correction first; else an answer rated >= 4 (or thumbs up) as self-distillation.
  A poorly rated answer without a correction is never a target.
- Time-ordered split: the newest `holdout_fraction` is held out for the gate (it is the traffic the
  candidate must be better on); exact duplicates are removed before the split.
- Replay: a share of the champion's own training data, so the candidate does not forget.
- Golden set: a curated row whose prompt (normalised, `user_data.normalized_prompt`) is in the task's golden
  set is never trained on, so the golden set stays a fair judge across versions; the rows are counted.
- Trust: only rows a retrain may learn come in (feedback.trust: `trainable`), so a correction counts by
  the distinct raters behind it, never by rows. Confirmed corrections are the `agreed` (or `reviewed`)
  ones: strong evidence even when there are few such prompts. They are listed apart so the retrain can
  learn a small, focused batch (the pipeline's small-data policy) instead of starving it.
- No rater outweighs many: rows that rest on one rater alone are capped at `max_share_per_rater` of the
  new rows (their newest kept).
- Labels: a classification task's correction that is not one of its labels teaches nothing it may answer:
  it is dropped and counted (`unknown_label`), as `flywheel train` does with such rows.
- Lineage: every training row names the curated events (and raters) it came from; a replayed row keeps
  them, so retracting an event finds every version that learned it, directly or through replay, and
  replay never brings a retracted event back.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from feedback.schemas import CuratedExample
from feedback.trust import Assessed, normalized, rater_of
from flywheel.r1 import split_reasoning
from flywheel.registry import TRAIN_DATA_FILE
from flywheel.tasks import TaskSpec
from training.kto import KtoExample, balance_kto
from training.user_data import normalized_prompt


class TrainExample(BaseModel):
    prompt: str
    reasoning: str
    answer: str
    source: Literal["correction", "approved", "replay", "bootstrap", "dataset"]
    at: datetime | None = None
    event_ids: list[str] = Field(default_factory=list, description="The curated feedback events it came from.")
    raters: list[str] = Field(default_factory=list, description="The distinct raters behind it.")
    replaces: str | None = Field(None, description="A correction's: the served answer it corrects.")


class RetrainData(BaseModel):
    train: list[TrainExample]
    holdout: list[TrainExample]
    replay: int
    feedback_rows: int
    usable: int
    duplicates: int
    confirmed: list[TrainExample] = Field(
        default_factory=list, description="Prompts with an agreed or reviewed correction (one row each, newest)."
    )
    confirmations: dict[str, int] = Field(default_factory=dict, description="Prompt -> raters who agree.")
    capped: int = Field(0, description="Rows left out because one rater alone would pass max_share_per_rater.")
    unknown_label: int = Field(0, description="Corrections left out because they are not one of the task's labels.")
    golden_held_out: int = Field(0, description="Usable rows left out because their prompt is in the golden set.")


def _prompt_text(row: CuratedExample) -> str:
    if row.prompt_kind == "text":
        return row.prompt
    messages = json.loads(row.prompt)
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _correction_answer(correction: str) -> str:
    return split_reasoning(correction)[1] if "</think>" in correction else correction


def target_of(row: CuratedExample) -> TrainExample | None:
    """The answer the model should have given, or None when the feedback teaches no target."""
    prompt = _prompt_text(row)
    origin = {"at": row.feedback_ts, "event_ids": [row.event_id], "raters": [rater_of(row)]}
    if row.correction:
        reasoning, answer = split_reasoning(row.correction) if "</think>" in row.correction else ("", row.correction)
        return TrainExample(prompt=prompt, reasoning=reasoning, answer=answer.strip(), source="correction",
                            replaces=row.answer, **origin)
    if (row.rating is not None and row.rating >= 4) or row.thumb == "up":
        return TrainExample(prompt=prompt, reasoning=row.reasoning, answer=row.answer, source="approved", **origin)
    return None


def kto_example(row: CuratedExample) -> KtoExample | None:
    """Unpaired thumbs for KTO: the served answer, labelled desirable or not."""
    if row.thumb is None and row.rating is None:
        return None
    good = row.thumb == "up" if row.thumb is not None else (row.rating or 0) >= 4
    completion = f"{row.reasoning}\n</think>\n\n{row.answer}"
    return KtoExample(prompt=_prompt_text(row), completion=completion, label=good)


def kto_training_rows(rows: Sequence[CuratedExample], holdout: Sequence[TrainExample],
                      golden_prompts: Iterable[str] = ()) -> list[KtoExample]:
    """KTO's rows: every rated answer except those of prompts held out for the gate or in the golden set,
    balanced up/down.

    ValueError when only one kind of verdict is left (all thumbs up, say): KTO has nothing to contrast.
    """
    held_out = {e.prompt for e in holdout}
    golden = golden_keys(golden_prompts)
    return balance_kto([k for k in map(kto_example, rows) if k is not None and k.prompt not in held_out
                        and normalized_prompt(k.prompt) not in golden])


def golden_keys(prompts: Iterable[str]) -> set[str]:
    """The golden set's prompts as rows are compared with them."""
    return {normalized_prompt(p) for p in prompts}


def read_train_data(adapter_dir: Path) -> list[TrainExample]:
    path = adapter_dir / TRAIN_DATA_FILE
    if not path.exists():
        return []
    return [TrainExample.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def write_train_data(adapter_dir: Path, examples: Sequence[TrainExample]) -> None:
    (adapter_dir / TRAIN_DATA_FILE).write_text("".join(e.model_dump_json() + "\n" for e in examples))


def _one_per_prompt(items: Sequence[Assessed]) -> tuple[list[TrainExample], dict[str, int]]:
    """One target per prompt: a correction beats an approval, the newest of each kind wins; the rows that gave
    the winning correction are merged into it (their events and raters). Also: prompt -> raters confirming it
    (agreed or reviewed corrections only)."""
    by_prompt: dict[str, TrainExample] = {}
    confirming: dict[str, int] = {}
    for item in sorted(items, key=lambda i: i.row.feedback_ts):
        example = target_of(item.row)
        if example is None:
            continue
        current = by_prompt.get(example.prompt)
        same = (current is not None and current.source == example.source == "correction"
                and normalized(current.answer) == normalized(example.answer))
        if same:
            example.event_ids = current.event_ids + example.event_ids
            example.raters = sorted(set(current.raters) | set(example.raters))
        if current is None or example.source == "correction" or current.source != "correction":
            by_prompt[example.prompt] = example
            confirming.pop(example.prompt, None)
            if example.source == "correction" and item.trust in ("agreed", "reviewed"):
                confirming[example.prompt] = max(item.raters, len(example.raters))
    return sorted(by_prompt.values(), key=lambda e: e.at or datetime.min), confirming


def cap_per_rater(examples: Sequence[TrainExample], max_share: float) -> list[TrainExample]:
    """Drop the oldest rows that rest on one rater alone until no rater alone makes up more than `max_share` of
    the rows (rows several raters agreed on are never dropped). Each pass drops in bulk; dropping shrinks the
    total, so passes repeat until none drops anything."""
    kept = list(examples)
    while True:
        limit = max(1, int(max_share * len(kept)))
        sole: dict[str, list[int]] = {}
        for index, e in enumerate(kept):
            if len(e.raters) == 1:
                sole.setdefault(e.raters[0], []).append(index)
        dropped = {i for indexes in sole.values() if len(indexes) > limit for i in indexes[:-limit]}
        if not dropped:
            return kept
        kept = [e for i, e in enumerate(kept) if i not in dropped]


def build_retrain_data(
    items: Sequence[Assessed],
    champion_data: Sequence[TrainExample],
    *,
    holdout_fraction: float,
    replay_fraction: float,
    max_share_per_rater: float = 1.0,
    retracted: set[str] | frozenset[str] = frozenset(),
    golden_prompts: Iterable[str] = (),
    seed: int = 0,
    task: TaskSpec | None = None,
) -> RetrainData:
    """`items`: the trainable curated rows (feedback.trust); `retracted`: events replay must not bring back;
    `task`: a classification task's corrections that are not one of its labels are left out; `golden_prompts`:
    the task's golden set, whose prompts are held out of training (and not used for the hold-out either: the
    golden slice judges them)."""
    given = len(items)
    if task is not None and task.kind == "classification":
        items = [i for i in items
                 if not i.row.correction or task.label_of(_correction_answer(i.row.correction)) is not None]
    golden = golden_keys(golden_prompts)
    targets = [t for t in (target_of(i.row) for i in items) if t is not None]
    on_golden = {t.prompt for t in targets if normalized_prompt(t.prompt) in golden}
    chosen, confirming = _one_per_prompt(items)
    learnable = [e for e in chosen if e.prompt not in on_golden]
    unique = cap_per_rater(learnable, max_share_per_rater)
    cut = len(unique) - max(1, round(len(unique) * holdout_fraction)) if unique else 0
    train, holdout = unique[:cut], unique[cut:]
    replay_count = round(len(train) * replay_fraction / (1 - replay_fraction)) if train else 0
    prompts = {e.prompt for e in chosen}
    pool = [e for e in champion_data if e.prompt not in prompts and not retracted.intersection(e.event_ids)]
    replay = random.Random(seed).sample(pool, min(replay_count, len(pool)))
    replayed = [e.model_copy(update={"source": "replay"}) for e in replay]
    confirmed = [e for e in unique if e.prompt in confirming]
    return RetrainData(
        train=train + replayed,
        holdout=holdout,
        replay=len(replayed),
        feedback_rows=given,
        usable=len(targets),
        duplicates=len(targets) - len(chosen),
        confirmed=confirmed,
        confirmations={e.prompt: confirming[e.prompt] for e in confirmed},
        capped=len(learnable) - len(unique),
        unknown_label=given - len(items),
        golden_held_out=sum(t.prompt in on_golden for t in targets),
    )


def well_rated(items: Sequence[Assessed], version: str, *, limit: int) -> list[TrainExample]:
    """The newest answers of `version` that users rated well (>= 4 or thumbs up), one per prompt, at most `limit`,
    leaving out every prompt someone corrected: the answers a small-data candidate must still give."""
    corrected = {_prompt_text(i.row) for i in items if i.row.correction}
    chosen: dict[str, TrainExample] = {}
    for item in sorted(items, key=lambda i: i.row.feedback_ts, reverse=True):
        if len(chosen) == limit:
            break
        target = target_of(item.row) if item.row.adapter_version == version else None
        if (target is not None and target.source == "approved" and target.prompt not in corrected
                and target.prompt not in chosen):
            chosen[target.prompt] = target
    return list(chosen.values())


def confirmed_batch(
    data: RetrainData, champion_data: Sequence[TrainExample], *, replay_per_row: int, generation: bool,
    retracted: set[str] | frozenset[str] = frozenset(), seed: int = 0,
) -> list[TrainExample]:
    """Training rows for the small-data policy: every confirmed correction, weighted by the raters who agree
    on it, plus a replay of the champion's own data large enough that the rest is not forgotten (the pool is
    repeated when it is smaller than that).

    On a generation task a correction supersedes the answer it corrects: replayed rows teaching that answer
    (the corrected prompt's other phrasings, most likely) would teach back what users corrected away, so the
    replay leaves them out. A classification label stays right for other prompts, so there nothing is left out.
    """
    weighted = [e for e in data.confirmed for _ in range(data.confirmations[e.prompt])]
    confirmed_prompts = {e.prompt for e in data.confirmed}
    superseded = _superseded_answers(data.confirmed, champion_data) if generation else set()
    pool = [e for e in champion_data if e.prompt not in confirmed_prompts and not retracted.intersection(e.event_ids)
            and normalized(e.answer) not in superseded]
    wanted = len(weighted) * replay_per_row
    shuffled = random.Random(seed).sample(pool, len(pool))
    replay = [shuffled[i % len(shuffled)] for i in range(wanted)] if shuffled else []
    return weighted + [e.model_copy(update={"source": "replay"}) for e in replay]


def _superseded_answers(corrections: Sequence[TrainExample], champion_data: Sequence[TrainExample]) -> set[str]:
    """The answers corrections replace: the one the champion was trained to give on a corrected prompt, or
    where it had none, the served one. An answer a correction gives again is not superseded."""
    trained: dict[str, list[str]] = {}
    for e in champion_data:
        trained.setdefault(normalized_prompt(e.prompt), []).append(e.answer)
    old = [a for e in corrections for a in trained.get(normalized_prompt(e.prompt)) or [e.replaces or ""] if a]
    return {normalized(a) for a in old} - {normalized(e.answer) for e in corrections}
