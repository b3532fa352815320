"""Tasks: what a company asks its model to do, declared once and used by every plane.

A task has a name (it becomes a path and the prefix of its adapter versions, so it is validated), a
kind (`classification` with its labels, or `generation`), the metric its gate judges with, an optional
instruction (a system prompt added to every conversation that has none), and the token budgets that
serving, evaluation, the probe and training all read from here. R1-distilled models think for
hundreds of tokens before `</think>`, so the default budgets leave room for that.

The demo task is one task declared like any other (`DEMO_TASK`), the default when config names none.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Names become registry paths. These patterns serve pydantic (Rust regex: `$` is the end of the text) and
# Python's `re`, whose `$` also matches before a final "\n": check them there with `fullmatch`, never `match`.
TASK_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
TaskName = Annotated[
    str, Field(pattern=TASK_NAME_PATTERN, description="Lowercase letters, digits and dashes; at most 64.")
]
VERSION_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}-v[0-9]{1,9}$"
VersionName = Annotated[str, Field(pattern=VERSION_PATTERN, description="`<task>-v<N>`, e.g. demo-v3.")]
BASE_VERSION_PATTERN = r"^[A-Za-z0-9._-]{1,128}-v[0-9]{1,9}$"
BaseVersionName = Annotated[str, Field(pattern=BASE_VERSION_PATTERN,
                                       description="`<model>-gptq-w<bits>g<group>-v<N>`, e.g. demo-gptq-w4g128-v1.")]

ClassificationMetric = Literal["accuracy", "macro_f1"]
GenerationMetric = Literal["exact_match", "contains", "token_f1", "rouge_l", "chrf"]
CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "macro_f1")
GENERATION_METRICS: tuple[str, ...] = ("exact_match", "contains", "token_f1", "rouge_l", "chrf")
# 0/1 per example: paired by McNemar; the others are continuous: paired bootstrap.
BINARY_METRICS: tuple[str, ...] = ("accuracy", "exact_match", "contains")


class TaskSpec(BaseModel):
    """One task: its kind, metric, prompt and budgets. Stored in the registry beside its versions."""

    model_config = ConfigDict(extra="forbid")

    name: TaskName
    kind: Literal["classification", "generation"] = "generation"
    labels: list[str] = Field(
        default_factory=list, description="Classification: every answer the model may give (at least two)."
    )
    metric: ClassificationMetric | GenerationMetric | None = Field(
        None, description="What the gate compares: accuracy/macro_f1 (classification), exact_match/contains/"
        "token_f1/rouge_l/chrf (generation). None: accuracy or token_f1 by kind.",
    )
    instruction: str | None = Field(
        None, description="System prompt added to conversations that carry none (serving and training)."
    )
    max_new_tokens: int = Field(
        512, ge=1, description="Answer budget (thinking included) for serving's default, evaluation and the probe."
    )
    max_seq_len: int = Field(
        1024, ge=16, description="Training sequence length; longer rows are reported and skipped, never cut."
    )
    golden_path: str | None = Field(
        None, description="JSONL/CSV/Parquet file of the task's fixed regression set; None: the test split of "
        "the first `flywheel train`.",
    )
    rollout: Literal["direct", "canary"] = Field(
        "direct", description="What a candidate the gate passed does next: `direct` becomes champion at once; "
        "`canary` serves a growing share of users and is promoted or rolled back on their ratings (see `canary`).")
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.kind == "classification":
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ValueError(f"task {self.name!r}: a classification task needs at least two distinct labels")
            if self.metric not in (None, *CLASSIFICATION_METRICS):
                raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not a classification metric "
                                 f"({', '.join(CLASSIFICATION_METRICS)})")
        else:
            if self.labels:
                raise ValueError(f"task {self.name!r}: labels only make sense for a classification task")
            if self.metric not in (None, *GENERATION_METRICS):
                raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not a generation metric "
                                 f"({', '.join(GENERATION_METRICS)})")
        return self

    @property
    def gate_metric(self) -> str:
        return self.metric or ("accuracy" if self.kind == "classification" else "token_f1")

    @property
    def binary_metric(self) -> bool:
        """Whether the gate metric scores each example 0 or 1 (McNemar) rather than continuously."""
        return self.gate_metric in BINARY_METRICS

    def label_of(self, answer: str) -> str | None:
        """The label `answer` is, Unicode form, spacing, case and invisible characters aside (None: not one of
        them). A classification task's corrections and training answers must each be one of its labels."""
        key = _label_key(answer)
        return next((label for label in self.labels if _label_key(label) == key), None)

    def conversation(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """`messages` with the task's instruction as the system turn when they carry none."""
        if self.instruction and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.instruction}, *messages]
        return messages


def _label_key(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf")).casefold()


# The built-in demo: financial-news sentiment in Chinese and English (training/demo_task.py makes its data).
DEMO_TASK = TaskSpec(
    name="demo",
    kind="classification",
    labels=["positive", "negative", "neutral", "积极", "消极", "中性"],
    metric="accuracy",
    max_new_tokens=64,
    max_seq_len=256,
    description="Built-in demo: sentiment of generated financial news (zh/en).",
)
