"""The transformers+PEFT reference engine, and its parity with the vLLM engine that serves."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from flywheel.config import Settings
from flywheel.r1 import split_reasoning
from flywheel.registry import registry_for
from services.engines.chat import OFF_LOOP_CHARS, render_prompt_ids, tokenized_prompt
from services.engines.hf_engine import HFEngine
from services.engines.protocol import AdapterHandle, ChatMessage, PromptTooLongError, SamplingOptions
from tests.conftest import make_settings
from training.demo_task import generate_examples

PROMPTS = [e.prompt for e in generate_examples(8, seed=123, distribution="drifted")]
GREEDY = SamplingOptions(max_tokens=40)


def handle(settings: Settings, version: str) -> AdapterHandle:
    registry = registry_for(settings)
    return AdapterHandle(name=version, int_id=registry.manifest(version).number, path=registry.local_path(version))


async def answers(engine: HFEngine, adapter: AdapterHandle | None) -> list[str]:
    return [
        (await engine.generate([ChatMessage(role="user", content=p)], GREEDY, adapter, f"t{i}")).text
        for i, p in enumerate(PROMPTS)
    ]


@pytest.fixture
async def hf_engine(demo_home: Path) -> HFEngine:
    engine = HFEngine(make_settings(demo_home).base_model_path)
    await engine.start()
    return engine


async def test_reference_engine_serves_adapters_side_by_side(hf_engine: HFEngine, demo_home: Path) -> None:
    settings = make_settings(demo_home)
    v1, v2 = handle(settings, "demo-v1"), handle(settings, "demo-v2")
    await hf_engine.add_adapter(v1)
    await hf_engine.add_adapter(v2)
    with_v1, with_v2, base = await answers(hf_engine, v1), await answers(hf_engine, v2), await answers(hf_engine, None)
    assert with_v1 != with_v2 and with_v1 != base
    assert all("</think>" in text for text in with_v2), with_v2  # the R1 format survives the adapter
    await hf_engine.remove_adapter(v1)
    assert await answers(hf_engine, v2) == with_v2  # removing one leaves the other intact


async def test_reference_engine_refuses_prompts_over_the_context(hf_engine: HFEngine) -> None:
    with pytest.raises(PromptTooLongError, match="context"):
        await hf_engine.generate([ChatMessage(role="user", content="surged " * 400)],
                                 SamplingOptions(max_tokens=200), None, "long")


async def test_reference_engine_makes_answers_as_long_as_asked(hf_engine: HFEngine, demo_home: Path) -> None:
    v1 = handle(make_settings(demo_home), "demo-v1")
    await hf_engine.add_adapter(v1)
    chat = [ChatMessage(role="user", content=PROMPTS[0])]
    natural = await hf_engine.generate(chat, GREEDY, v1, "natural")
    assert natural.completion_tokens < 24 and natural.finish_reason == "stop"
    fixed = await hf_engine.generate(chat, GREEDY.model_copy(update={"ignore_eos": True}), v1, "fixed")
    floored = await hf_engine.generate(chat, GREEDY.model_copy(update={"min_tokens": 24}), v1, "floored")
    assert (fixed.completion_tokens, fixed.finish_reason) == (40, "length") and floored.completion_tokens >= 24


@pytest.mark.serve
@pytest.mark.vllm
async def test_vllm_engine_matches_the_reference_greedy(hf_engine: HFEngine, served, served_registry) -> None:
    """Engine parity: a wrongly loaded LoRA in vLLM shows up as different greedy answers."""
    url, settings = served
    version = served_registry.alias("champion")
    await hf_engine.add_adapter(handle(settings, version))
    reference = [split_reasoning(text)[1] for text in await answers(hf_engine, handle(settings, version))]
    async with httpx.AsyncClient(timeout=60) as client:
        served_answers = []
        for prompt in PROMPTS:
            body = (await client.post(f"{url}/predict", json={"prompt": prompt, "max_tokens": 40})).json()
            assert body["adapter_version"] == version
            served_answers.append(body["answer"])
    agreement = sum(a == b for a, b in zip(reference, served_answers, strict=True)) / len(PROMPTS)
    assert agreement >= 0.75, list(zip(reference, served_answers, strict=True))


@pytest.mark.vllm
async def test_reference_logprobs_agree_across_engines(hf_engine: HFEngine, demo_home: Path) -> None:
    """Perplexity of reference answers (a gate metric) is the same number on either engine."""
    from services.engines.vllm_engine import VLLMEngine

    settings = make_settings(demo_home)
    adapter = handle(settings, "demo-v1")
    await hf_engine.add_adapter(adapter)
    vllm_engine = VLLMEngine(settings.base_model_path, max_model_len=512)
    await vllm_engine.start()
    try:
        await vllm_engine.add_adapter(adapter)
        example = generate_examples(1, seed=5)[0]
        messages = [ChatMessage(role="user", content=example.prompt)]
        completion = f"{example.reasoning}\n</think>\n\n{example.answer}"
        for lora in (adapter, None):
            hf_sum, hf_n = await hf_engine.completion_logprob(messages, completion, lora)
            vllm_sum, vllm_n = await vllm_engine.completion_logprob(messages, completion, lora)
            assert hf_n == vllm_n > 5
            assert vllm_sum == pytest.approx(hf_sum, rel=0.05, abs=0.5)
        wrong = completion.replace(example.answer, "??")
        assert (await vllm_engine.completion_logprob(messages, wrong, adapter))[0] < vllm_sum
    finally:
        await vllm_engine.shutdown()


class CountingTokenizer:
    """A vocabulary whose longest token is 4 characters; records which thread tokenized each prompt."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "ab": 1, "abcd": 2}

    def apply_chat_template(self, messages: list[dict[str, str]], **_: object) -> list[int]:
        self.threads.append(threading.get_ident())
        return [0] * sum(len(m["content"]) for m in messages)


def test_a_prompt_the_context_cannot_hold_is_refused_before_tokenizing_and_a_long_one_leaves_the_loop() -> None:
    """64 000 characters to a 512-token model: refused from its length alone; a long prompt that may fit
    is tokenized in a worker thread, so the replica's event loop keeps serving."""
    tokenizer = CountingTokenizer()
    with pytest.raises(PromptTooLongError, match="64000 characters"):
        render_prompt_ids(tokenizer, [ChatMessage(role="user", content="1." * 32_000)], 4, 512)
    assert tokenizer.threads == []

    async def tokenize(chars: int) -> int:
        await tokenized_prompt(tokenizer, [ChatMessage(role="user", content="a" * chars)], 4, 100_000)
        return threading.get_ident()

    assert asyncio.run(tokenize(100)) == tokenizer.threads[-1]  # short: on the loop, no thread hop
    assert asyncio.run(tokenize(OFF_LOOP_CHARS + 1)) != tokenizer.threads[-1]
