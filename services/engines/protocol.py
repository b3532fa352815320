"""The engine protocol every serving engine implements, and the types it speaks.

An engine owns one base model and any number of resident LoRA adapters. It knows nothing about the
registry or aliases: the adapter manager decides what to load and which adapter a request uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field


class EngineError(Exception):
    """The engine could not serve a request (not the caller's fault)."""


class UnsupportedBaseError(EngineError):
    """The configured engine cannot run the configured base on this machine."""


class PromptTooLongError(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""


class AdapterHandle(BaseModel):
    """One adapter version as the engine sees it. `name` and `int_id` are never reused for other weights."""

    name: str
    int_id: int = Field(ge=1)
    path: Path


class ChatMessage(BaseModel):
    role: str
    content: str


class SamplingOptions(BaseModel):
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, description="Generation ends before any of these.")
    min_tokens: int = Field(0, ge=0, description="Tokens made before an end of sequence or a stop may end the answer.")
    ignore_eos: bool = Field(False, description="Make max_tokens tokens whatever the model's end of sequence says.")


class Generation(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    opened_think: bool = Field(
        False, description="The chat template's generation prompt opened <think> (R1): the text starts inside it."
    )


@runtime_checkable
class Engine(Protocol):
    """What the LLM deployment needs from an engine."""

    base_model: str

    async def start(self) -> None: ...

    async def add_adapter(self, adapter: AdapterHandle) -> None: ...

    async def remove_adapter(self, adapter: AdapterHandle) -> None: ...

    async def generate(
        self,
        messages: list[ChatMessage],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
        request_id: str,
    ) -> Generation: ...

    def stream(
        self,
        messages: list[ChatMessage],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
        request_id: str,
    ) -> AsyncIterator[Generation]:
        """The completion as it is made: each item's `text` is the new piece, token counts are running
        totals, and the last item carries the `finish_reason`."""
        ...

    async def completion_logprob(
        self, messages: list[ChatMessage], completion: str, adapter: AdapterHandle | None
    ) -> tuple[float, int]:
        """(sum of log-probabilities, token count) of `completion` as the answer to `messages`."""
        ...

    async def shutdown(self) -> None: ...


async def collect(pieces: AsyncIterator[Generation], request_id: str) -> Generation:
    """A whole `Generation` from a stream of pieces (how engines answer a non-streamed request)."""
    text: list[str] = []
    last: Generation | None = None
    async for piece in pieces:
        text.append(piece.text)
        last = piece
    if last is None:
        raise EngineError(f"the engine returned no output for request {request_id}")
    return last.model_copy(update={"text": "".join(text)})
