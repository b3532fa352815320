"""Score adapters on evaluation slices with the engine that serves them, by the task's own metric.

Every adapter sees the same examples in the same order, so the per-example scores pair up for the
gate's significance test. Per slice: the task's gate metric (mean and per example), every metric of
its kind for the report (classification: accuracy, macro-F1, per-label scores and the confusion
matrix; generation: exact match, contains, token-F1, ROUGE-L, chrF), format validity (a closed think
block and a non-empty answer), the share cut off while thinking (never scored as an answer),
perplexity of the reference answers and mean latency. Every adapter is warmed before any request is timed,
and the adapters are asked in turns (example 0 of each, then example 1 …), so drift in the engine's speed
falls on both alike and their latencies compare. Budgets come from the task. The parity probe compares the
serving engine's greedy answers with the PEFT reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from flywheel.r1 import split_completion
from flywheel.registry import Registry
from flywheel.tasks import TaskSpec
from services.engines.protocol import AdapterHandle, ChatMessage, Engine, PromptTooLongError, SamplingOptions
from training.metrics import classification_report, generation_report, match_label
from training.sft import completion_text

T = TypeVar("T")
CONCURRENCY = 16  # enough to keep a private vLLM engine's continuous batching busy
WARMUP_TOKENS = 8  # a warm-up request only has to reach the adapter, not answer


class EvalExample(BaseModel):
    """A conversation (ending with the user turn) and the answer it should get."""

    messages: list[dict[str, str]]
    answer: str
    reasoning: str = ""

    @classmethod
    def of(cls, prompt: str, answer: str, reasoning: str = "") -> EvalExample:
        return cls(messages=[{"role": "user", "content": prompt}], answer=answer, reasoning=reasoning)

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


class SliceScores(BaseModel):
    """One adapter on one evaluation slice."""

    n: int
    metric: str = Field(description="The task's gate metric.")
    score: float = Field(description="The gate metric on the slice (accuracy, macro-F1 or the generation mean).")
    per_example: list[float] = Field(description="Per example, in slice order: the pairing for significance.")
    predicted_labels: list[str | None] = Field(
        default_factory=list, exclude=True,
        description="Classification, per example in slice order: the label the answer named (None: none or several); "
        "with `expected_labels` the pairing for a macro-F1 test. Left out of reports, like the raw scores.")
    expected_labels: list[str] = Field(default_factory=list, exclude=True)
    metrics: dict[str, float] = Field(default_factory=dict, description="Every metric of the task's kind.")
    classification: dict[str, Any] | None = Field(None, description="Per-label scores and confusion matrix.")
    format_validity: float = Field(description="Share of the answered prompts (not `too_long`) with a closed think "
                                   "block and an answer.")
    truncated: float = Field(0.0, description="Share of completions cut off while thinking (scored 0).")
    too_long: int = Field(0, description="Examples whose prompt did not fit the context with the answer budget: "
                          "scored 0, left out of format validity and latency, reported apart.")
    perplexity: float | None = None
    mean_latency_ms: float
    samples: list[dict[str, str]] = Field(default_factory=list, description="A few predictions, for the report.")


def golden_examples(registry: Registry) -> list[EvalExample]:
    """The task's fixed regression set from the registry (empty when it has none yet)."""
    text = registry.golden_text()
    if not text:
        return []
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [EvalExample(messages=r["messages"], answer=r["answer"], reasoning=r.get("reasoning", "")) for r in rows]


def _chat(spec: TaskSpec, example: EvalExample) -> list[ChatMessage]:
    return [ChatMessage(**m) for m in spec.conversation(example.messages)]


async def _bounded(coros: list[Awaitable[T]], limit: int = CONCURRENCY) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def run(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))


class _Answer(BaseModel):
    text: str
    valid: bool
    truncated: bool
    too_long: bool
    ms: float


async def _answer(engine: Engine, spec: TaskSpec, adapter: AdapterHandle | None, i: int,
                  example: EvalExample) -> _Answer:
    greedy = SamplingOptions(max_tokens=spec.max_new_tokens)
    started = time.perf_counter()
    try:
        generation = await engine.generate(_chat(spec, example), greedy, adapter, f"eval-{i}-{time.time_ns()}")
    except PromptTooLongError:
        return _Answer(text="", valid=False, truncated=False, too_long=True, ms=0.0)
    elapsed = (time.perf_counter() - started) * 1000
    _, predicted, truncated = split_completion(generation.text, opened_think=generation.opened_think)
    return _Answer(text=predicted, valid=not truncated and "</think>" in generation.text and bool(predicted),
                   truncated=truncated, too_long=False, ms=elapsed)


async def _logprob(engine: Engine, spec: TaskSpec, adapter: AdapterHandle | None,
                   example: EvalExample) -> tuple[float, int]:
    try:
        return await engine.completion_logprob(_chat(spec, example), completion_text(example.reasoning,
                                                                                     example.answer), adapter)
    except PromptTooLongError:
        return 0.0, 0


def _scorable(examples: list[EvalExample], spec: TaskSpec) -> list[EvalExample]:
    if spec.kind == "classification":  # a reference naming no label cannot be scored (data loading refuses them)
        return [e for e in examples if match_label(e.answer, spec.labels) is not None]
    return examples


def _slice_scores(examples: list[EvalExample], results: list[_Answer], logprobs: list[tuple[float, int]],
                  spec: TaskSpec) -> SliceScores:
    n = len(examples)
    predictions = [r.text for r in results]
    references = [e.answer for e in examples]
    classification = None
    predicted: list[str | None] = []
    expected: list[str] = []
    if spec.kind == "classification":
        predicted = [match_label(p, spec.labels) for p in predictions]
        expected = [match_label(r, spec.labels) or "" for r in references]
        report = classification_report(predicted, expected, spec.labels)
        per_example = [float(p == e) for p, e in zip(predicted, expected, strict=True)]
        metrics = {"accuracy": report.accuracy, "macro_f1": report.macro_f1}
        score = metrics[spec.gate_metric]
        classification = report.model_dump()
    else:
        generated = generation_report(spec.gate_metric, predictions, references)
        per_example, metrics = generated.values, generated.means
        score = metrics[spec.gate_metric]
    total_logprob = sum(lp for lp, _ in logprobs)
    total_tokens = sum(k for _, k in logprobs)
    answered = [r.ms for r in results if not r.too_long]
    return SliceScores(
        n=n,
        metric=spec.gate_metric,
        score=score if n else 0.0,
        per_example=per_example,
        metrics=metrics,
        classification=classification,
        predicted_labels=predicted,
        expected_labels=expected,
        format_validity=sum(r.valid for r in results) / len(answered) if answered else 0.0,
        truncated=sum(r.truncated for r in results) / n if n else 0.0,
        too_long=sum(r.too_long for r in results),
        perplexity=math.exp(-total_logprob / total_tokens) if total_tokens else None,
        mean_latency_ms=sum(answered) / len(answered) if answered else 0.0,
        samples=[{"prompt": e.prompt[:200], "expected": e.answer[:200], "predicted": p[:200]}
                 for e, p in list(zip(examples, predictions, strict=True))[:5]],
    )


async def _score_arms(
    engine: Engine, adapters: dict[str, AdapterHandle | None], examples: list[EvalExample], spec: TaskSpec, *,
    concurrency: int,
) -> dict[str, SliceScores]:
    """Every adapter on one slice. Requests go out interleaved (example 0 for each adapter, then example 1 …),
    so the adapters share the engine's load and drift alike and their latencies compare."""
    examples = _scorable(examples, spec)
    handles = list(adapters.values())
    results = await _bounded([_answer(engine, spec, handle, i, e) for i, e in enumerate(examples)
                              for handle in handles], concurrency)
    logprobs = await _bounded([_logprob(engine, spec, handle, e) for e in examples for handle in handles],
                              concurrency)
    return {name: _slice_scores(examples, results[k::len(handles)], logprobs[k::len(handles)], spec)
            for k, name in enumerate(adapters)}


async def score_slice(
    engine: Engine, adapter: AdapterHandle | None, examples: list[EvalExample], spec: TaskSpec, *,
    concurrency: int = CONCURRENCY,
) -> SliceScores:
    return (await _score_arms(engine, {"adapter": adapter}, examples, spec, concurrency=concurrency))["adapter"]


async def _warm(engine: Engine, adapters: dict[str, AdapterHandle | None], example: EvalExample,
                spec: TaskSpec) -> None:
    """One untimed request per adapter, so no adapter's first (loading, compiling) request is timed."""
    for handle in adapters.values():
        with contextlib.suppress(PromptTooLongError):
            await engine.generate(_chat(spec, example), SamplingOptions(max_tokens=WARMUP_TOKENS), handle,
                                  f"eval-warmup-{time.time_ns()}")


async def evaluate(
    engine: Engine, adapters: dict[str, AdapterHandle | None], slices: dict[str, list[EvalExample]], spec: TaskSpec,
    *, concurrency: int = CONCURRENCY,
) -> dict[str, dict[str, SliceScores]]:
    """{name: {slice: scores}} for every adapter (None: the bare base) on every slice (adapters loaded), with
    at most `concurrency` requests in flight: every adapter warmed first, then the adapters interleaved
    request by request, so the gate's latency comparison is fair."""
    first = next((examples[0] for examples in slices.values() if examples), None)
    if first is not None:
        await _warm(engine, adapters, first, spec)
    by_slice = {slice_name: await _score_arms(engine, adapters, examples, spec, concurrency=concurrency)
                for slice_name, examples in slices.items()}
    return {name: {slice_name: scores[name] for slice_name, scores in by_slice.items()} for name in adapters}


async def parity(
    serving: Engine, reference: Engine, adapter: AdapterHandle, examples: list[EvalExample], spec: TaskSpec, *,
    limit: int | None = None,
) -> float:
    """Share of prompts where the serving engine's greedy answer equals the PEFT reference's, over the first `limit`
    prompts that fit the context (a prompt too long for it is skipped, as evaluation leaves it out)."""
    greedy = SamplingOptions(max_tokens=spec.max_new_tokens)
    agree = compared = 0
    for i, example in enumerate(examples):
        if limit is not None and compared >= limit:
            break
        chat = _chat(spec, example)
        try:
            served = await serving.generate(chat, greedy, adapter, f"parity-s-{i}-{time.time_ns()}")
            expected = await reference.generate(chat, greedy, adapter, f"parity-r-{i}")
        except PromptTooLongError:
            continue
        compared += 1
        agree += (split_completion(served.text, opened_think=served.opened_think).answer
                  == split_completion(expected.text, opened_think=expected.opened_think).answer)
    return agree / compared if compared else 1.0
