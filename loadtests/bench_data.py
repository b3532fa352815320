"""`flywheel bench data` and `flywheel bench own-task`: what a company's own data costs to take in.

- data: exact + near-duplicate removal throughput (rows/s) on synthetic rows with planted duplicates, and
  the whole `prepare_dataset` path (read, validate, normalise, mask PII, dedupe, split) on the same rows
  written as JSONL.
- own-task: `flywheel train`'s wall time per stage (load+clean+split, train on Ray Train, evaluate on the
  serving engine, register) for a synthetic classification export of N rows on the configured base.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from flywheel.config import Settings
from flywheel.tasks import TaskSpec
from training.user_data import Example, Turn, dedupe, prepare_dataset

URGENT = ["chest pain", "trouble breathing", "heavy bleeding", "fainted twice", "a seizure", "stroke signs"]
ROUTINE = ["a mild rash", "a refill request", "a checkup question", "a sore throat", "a booking change",
           "a vaccine question"]
WHO = ["Ann", "Bo", "Cruz", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Max", "Ned"]
WHEN = ["today", "since noon", "this week", "at night", "after lunch", "for an hour", "on and off", "again"]
TRIAGE = TaskSpec(name="triage", kind="classification", labels=["urgent", "routine"], max_new_tokens=48,
                  max_seq_len=256, instruction="Answer urgent or routine.")


def triage_rows(n: int, seed: int) -> list[dict[str, str]]:
    """A synthetic patient-message export (alpaca rows): the label hinges on one cue phrase."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = rng.choice(["urgent", "routine"])
        cue = rng.choice(URGENT if label == "urgent" else ROUTINE)
        text = f"{rng.choice(WHO)} ({rng.randint(18, 90)}) writes: {cue} {rng.choice(WHEN)}"
        if text not in seen:  # about 98 000 distinct texts exist
            seen.add(text)
            rows.append({"instruction": "Triage this patient message.", "input": text, "output": label})
    return rows


def _synthetic(n: int, seed: int) -> list[Example]:
    """~180-character support rows; 5 % exact copies and 5 % one-character edits of earlier rows."""
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in "bcdfghjklmnprstvz" for b in ("a", "e", "i", "o", "u", "ar", "en", "ix")]
    rows: list[Example] = []
    for i in range(n):
        if rows and rng.random() < 0.05:
            rows.append(rng.choice(rows).model_copy(update={"line": i + 1}))
            continue
        if rows and rng.random() < 0.05:
            base = rng.choice(rows)
            text = base.prompt
            at = rng.randrange(len(text))
            rows.append(Example(messages=[Turn(role="user", content=text[:at] + "x" + text[at + 1:])],
                                answer=base.answer, line=i + 1))
            continue
        prompt = " ".join(rng.choice(words) for _ in range(22))
        rows.append(Example(messages=[Turn(role="user", content=prompt)],
                            answer=" ".join(rng.choice(words) for _ in range(8)), line=i + 1))
    return rows


class DataBenchReport(BaseModel):
    rows: int
    dedupe_s: float
    dedupe_rows_per_s: float
    exact_removed: int
    near_found: int
    prepare_s: float = Field(description="prepare_dataset on the rows as JSONL: read → … → split.")
    prepare_rows_per_s: float

    def summary(self) -> str:
        return (f"dedupe: {self.rows} rows in {self.dedupe_s:.1f} s = {self.dedupe_rows_per_s:.0f} rows/s "
                f"({self.exact_removed} exact duplicates removed, {self.near_found} near duplicates found)\n"
                f"prepare_dataset (read, validate, normalise, mask PII, dedupe, split): {self.prepare_s:.1f} s = "
                f"{self.prepare_rows_per_s:.0f} rows/s")


def run_data_bench(rows: int = 100_000, seed: int = 0) -> DataBenchReport:
    examples = _synthetic(rows, seed)
    started = time.perf_counter()
    _, exact, near = dedupe(examples, 0.9)
    dedupe_s = time.perf_counter() - started
    spec = TaskSpec(name="bench")
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-data-") as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.answer}) + "\n" for e in examples))
        started = time.perf_counter()
        prepare_dataset(path, spec)
        prepare_s = time.perf_counter() - started
    return DataBenchReport(rows=rows, dedupe_s=dedupe_s, dedupe_rows_per_s=rows / dedupe_s, exact_removed=exact,
                           near_found=near, prepare_s=prepare_s, prepare_rows_per_s=rows / prepare_s)


class OwnTaskBenchReport(BaseModel):
    rows: int
    base: str
    stage_seconds: dict[str, float]
    total_s: float
    train_steps: int
    test_score_base: float | None
    test_score_adapter: float | None

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
        return (f"flywheel train, {self.rows} rows on {self.base}: {self.total_s:.1f} s ({stages}); "
                f"{self.train_steps} steps; test accuracy base {self.test_score_base} -> adapter "
                f"{self.test_score_adapter}")


def run_own_task_bench(settings: Settings, rows: int = 1000, say: Callable[[str], None] | None = None
                       ) -> OwnTaskBenchReport:
    """`flywheel train` of a synthetic triage export into a scratch registry, timed stage by stage."""
    from training.demo_bootstrap import bootstrap
    from training.train_task import TaskTrainer, TrainRequest

    bootstrap(settings, progress=say)  # builds the demo base if that is the base (not timed)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-own-") as tmp:
        settings = settings.model_copy(update={"registry": settings.registry.model_copy(
            update={"uri": str(Path(tmp) / "registry")})})
        data = Path(tmp) / "triage.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in triage_rows(rows, seed=1)))
        started = time.perf_counter()
        trainer = TaskTrainer(settings, TRIAGE, TrainRequest(task=TRIAGE.name, data=data), say=say)
        splits, data_report = trainer.prepare()
        report = trainer.run(splits, data_report)
        total = time.perf_counter() - started
    scores = report.evaluation
    return OwnTaskBenchReport(
        rows=rows, base=settings.model.base, stage_seconds=report.stage_seconds, total_s=total,
        train_steps=report.training.get("steps", 0),
        test_score_base=scores.get("base", {}).get("score"),
        test_score_adapter=scores.get("candidate", {}).get("score"),
    )
