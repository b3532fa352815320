"""Opening a streamed answer from the LLM deployment: shared by `/predict` and `/v1/chat/completions`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from flywheel.registry import AdapterIntegrityError, UnknownTaskError, VersionNotFoundError
from services.engines.protocol import ChatMessage, PromptTooLongError, SamplingOptions
from services.protocol import StreamEvent

# What a replica refuses because of the request (a 4xx), as opposed to trouble of its own (a 503).
REFUSALS = (PromptTooLongError, UnknownTaskError, VersionNotFoundError, AdapterIntegrityError)


async def open_stream(
    llm: DeploymentHandle, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
    version: str | None,
) -> tuple[StreamEvent, AsyncIterator[StreamEvent]]:
    """The first event, and all of them (the first again, up to the one that is `done`).

    The first event comes with the first tokens, so a request the replica refuses raises here, before
    the caller has sent a byte: it can still answer with a proper error status.
    """
    events = llm.options(stream=True).generate_stream.remote(chat, options, request_id, task, version)
    first: StreamEvent = await events.__anext__()

    async def every_event() -> AsyncIterator[StreamEvent]:
        event = first
        yield event
        while not event.done:
            event = await events.__anext__()
            yield event

    return first, every_event()
