"""Opening a streamed answer from the LLM deployment: shared by `/predict` and `/v1/chat/completions`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from services.engines.protocol import ChatMessage, SamplingOptions
from services.protocol import REFUSED, Completion, Refusal, StreamEvent

# What a replica refuses because of the request (a 4xx), as opposed to trouble of its own (a 503).
REFUSALS = tuple(REFUSED)


def answered(result: Completion | Refusal) -> Completion:
    """A replica's answer to `generate`; a refusal raised here, in the caller, as the error it stands for."""
    if isinstance(result, Refusal):
        raise result.error()
    return result


async def open_stream(
    llm: DeploymentHandle, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
    version: str | None, user: str | None = None,
) -> tuple[StreamEvent, AsyncIterator[StreamEvent]]:
    """The first event, and all of them (the first again, up to the one that is `done`).

    The first event comes with the first tokens, so a request the replica refuses raises here, before
    the caller has sent a byte: it can still answer with a proper error status.
    """
    events = llm.options(stream=True, multiplexed_model_id=task).generate_stream.remote(  # task: see LLMServer
        chat, options, request_id, task, version, user)
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
