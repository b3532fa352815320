"""How the gateway asks the LLM server for answers, whichever process the server lives in.

`serving.topology: split` puts the LLM server in replicas of its own, reached through a Serve handle
(`RemoteLLM`); `fused` runs it inside the ingress replica itself (`LocalLLM`), one hop less per request.
`/predict` and `/v1/chat/completions` see the same two calls either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from ray.serve.handle import DeploymentHandle

from services.engines.protocol import ChatMessage, SamplingOptions
from services.protocol import REFUSED, Completion, Refusal, StreamEvent

if TYPE_CHECKING:
    from services.llm_server import LLMReplica

# What a replica refuses because of the request (a 4xx), as opposed to trouble of its own (a 503).
REFUSALS = tuple(REFUSED)


class LLMClient(Protocol):
    async def generate(self, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
                       version: str | None, user: str | None) -> Completion:
        """The whole answer; a refusal raised as the error it stands for."""
        ...

    def events(self, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
               version: str | None, user: str | None) -> AsyncIterator[StreamEvent]:
        """The answer as the engine makes it (see `LLMReplica.generate_stream`)."""
        ...


class RemoteLLM:
    """The LLM deployment's replicas, through a Serve handle. The task is the multiplexed model id: Serve
    prefers a replica that answered the task lately, whose LoRA is likely still loaded."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def generate(self, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
                       version: str | None, user: str | None) -> Completion:
        return answered(await self.handle.options(multiplexed_model_id=task).generate.remote(
            chat, options, request_id, task, version, user))

    def events(self, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
               version: str | None, user: str | None) -> AsyncIterator[StreamEvent]:
        return self.handle.options(stream=True, multiplexed_model_id=task).generate_stream.remote(
            chat, options, request_id, task, version, user)


class LocalLLM:
    """The LLM server in this very process: plain calls, nothing serialized."""

    def __init__(self, server: LLMReplica) -> None:
        self.server = server

    async def generate(self, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
                       version: str | None, user: str | None) -> Completion:
        return answered(await self.server.generate(chat, options, request_id, task, version, user))

    def events(self, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
               version: str | None, user: str | None) -> AsyncIterator[StreamEvent]:
        return self.server.generate_stream(chat, options, request_id, task, version, user)


def answered(result: Completion | Refusal) -> Completion:
    """A replica's answer to `generate`; a refusal raised here, in the caller, as the error it stands for."""
    if isinstance(result, Refusal):
        raise result.error()
    return result


async def open_stream(
    llm: LLMClient, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
    version: str | None, user: str | None = None,
) -> tuple[StreamEvent, AsyncIterator[StreamEvent]]:
    """The first event, and all of them (the first again, up to the one that is `done`).

    The first event comes with the first tokens, so a request the replica refuses raises here, before
    the caller has sent a byte: it can still answer with a proper error status.
    """
    events = llm.events(chat, options, request_id, task, version, user)
    first: StreamEvent = await events.__anext__()
    if first.refusal is not None:
        raise first.refusal.error()

    async def every_event() -> AsyncIterator[StreamEvent]:
        event = first
        yield event
        while not event.done:
            event = await events.__anext__()
            if event.refusal is not None:
                raise event.refusal.error()
            yield event

    return first, every_event()
