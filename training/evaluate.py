"""Score adapters on evaluation slices with the engine that serves them.

Every adapter sees the same examples in the same order, so the per-example results pair up for the
gate's significance test. Metrics per slice: answer accuracy (text after `</think>`, normalised),
format validity (a closed think block and a non-empty answer), perplexity of the reference answers,
mean latency. The parity probe compares the serving engine's greedy answers with the PEFT reference.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from flywheel.config import Settings
from flywheel.r1 import split_reasoning
from services.engines.protocol import AdapterHandle, ChatMessage, Engine, SamplingOptions
from training.demo_task import golden_set, normalize_answer
from training.gate import SliceScores
from training.sft import completion_text

T = TypeVar("T")
CONCURRENCY = 16  # enough to keep vLLM's continuous batching busy


class EvalExample(BaseModel):
    prompt: str
    answer: str
    reasoning: str = ""


def golden_examples(settings: Settings) -> list[EvalExample]:
    """The task's fixed regression set (the demo task ships one)."""
    path = settings.retrain.golden_path
    if path:
        return [EvalExample.model_validate_json(line) for line in Path(path).read_text().splitlines() if line]
    return [EvalExample(prompt=e.prompt, answer=e.answer, reasoning=e.reasoning) for e in golden_set()]


def _chat(prompt: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=prompt)]


async def _bounded(coros: list[Awaitable[T]], limit: int = CONCURRENCY) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def run(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))


async def score_slice(
    engine: Engine, adapter: AdapterHandle | None, examples: list[EvalExample], *, max_tokens: int = 64
) -> SliceScores:
    greedy = SamplingOptions(max_tokens=max_tokens)

    async def answer(i: int, example: EvalExample) -> tuple[str, bool, float]:
        started = time.perf_counter()
        generation = await engine.generate(_chat(example.prompt), greedy, adapter, f"eval-{i}-{time.time_ns()}")
        elapsed = (time.perf_counter() - started) * 1000
        _, predicted = split_reasoning(generation.text)
        return predicted, "</think>" in generation.text and bool(predicted), elapsed

    results = await _bounded([answer(i, e) for i, e in enumerate(examples)])
    logprobs = await _bounded([
        engine.completion_logprob(_chat(e.prompt), completion_text(e.reasoning, e.answer), adapter)
        for e in examples
    ])
    correct = [normalize_answer(pred) == normalize_answer(e.answer) for (pred, _, _), e in zip(
        results, examples, strict=True)]
    total_logprob = sum(lp for lp, _ in logprobs)
    total_tokens = sum(n for _, n in logprobs)
    return SliceScores(
        n=len(examples),
        accuracy=sum(correct) / len(examples),
        format_validity=sum(valid for _, valid, _ in results) / len(examples),
        perplexity=math.exp(-total_logprob / total_tokens) if total_tokens else None,
        mean_latency_ms=sum(ms for _, _, ms in results) / len(examples),
        correct=correct,
    )


async def evaluate(
    engine: Engine, adapters: dict[str, AdapterHandle], slices: dict[str, list[EvalExample]]
) -> dict[str, dict[str, SliceScores]]:
    """{version: {slice: scores}} for every adapter on every slice (adapters must be loaded)."""
    return {
        version: {name: await score_slice(engine, handle, examples) for name, examples in slices.items()}
        for version, handle in adapters.items()
    }


async def parity(
    serving: Engine, reference: Engine, adapter: AdapterHandle, prompts: list[str], *, max_tokens: int = 48
) -> float:
    """Share of prompts where the serving engine's greedy answer equals the PEFT reference's."""
    greedy = SamplingOptions(max_tokens=max_tokens)
    agree = 0
    for i, prompt in enumerate(prompts):
        served = await serving.generate(_chat(prompt), greedy, adapter, f"parity-s-{i}-{time.time_ns()}")
        expected = await reference.generate(_chat(prompt), greedy, adapter, f"parity-r-{i}")
        agree += split_reasoning(served.text)[1] == split_reasoning(expected.text)[1]
    return agree / len(prompts)
