"""What `/v1/chat/completions` and `/v1/models` do, apart from their routes (those stay in the gateway).

A request names a task as its `model`; that task's champion answers, through the same LLM deployment as
`/predict`, and the response's `model` names the exact version. `task@version` pins a version instead
(loaded on demand beside the champions). A streamed answer goes out as server-sent
`chat.completion.chunk` events as the engine makes tokens (reasoning deltas in both `reasoning_content` and
`reasoning`, then content deltas), an optional usage chunk, and `data: [DONE]`. Every answer is a
prediction event on the feedback bus, so `POST /feedback` accepts the completion's `id`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from feedback.schemas import Message, PredictionEvent
from flywheel.config import Settings
from flywheel.logs import REQUEST_LOGGER
from flywheel.registry import AdapterIntegrityError, UnknownTaskError, VersionNotFoundError
from flywheel.tasks import TaskSpec
from services.adapters import BUSY_RETRY_AFTER_S, AdaptersBusyError
from services.engines.protocol import SamplingOptions
from services.llm_client import REFUSALS, LLMClient, open_stream
from services.metrics import GatewayMetrics
from services.openai_protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    OpenAIError,
    OpenAIErrorBody,
)
from services.protocol import Usage, client_message

log = logging.getLogger("flywheel.openai")
request_log = logging.getLogger(REQUEST_LOGGER)

ROUTE = "/v1/chat/completions"
COMPLETION_ID_PREFIX = "chatcmpl-"


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> JSONResponse:
    body = OpenAIError(error=OpenAIErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(status_code=status, content=body.model_dump())


def _usage(usage: Usage) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                           total_tokens=usage.prompt_tokens + usage.completion_tokens)


class ChatCompletions:
    """The handler behind `/v1/chat/completions`: testable without HTTP, given an LLM client."""

    def __init__(
        self,
        llm: LLMClient,
        settings: Settings,
        tasks: Callable[[], Awaitable[dict[str, TaskSpec]]],
        publish: Callable[[PredictionEvent], Awaitable[bool]],
        metrics: GatewayMetrics,
    ) -> None:
        self.llm = llm
        self.settings = settings
        self.tasks = tasks
        self.publish = publish
        self.metrics = metrics

    def _reject(self, status: int, message: str, param: str | None, code: str | None = None) -> JSONResponse:
        self.metrics.requests.labels(ROUTE, str(status)).inc()
        log.info("event=chat_rejected status=%d param=%s message=%r", status, param, message)
        return openai_error(status, message, param=param, code=code)

    async def __call__(self, body: ChatCompletionRequest, asker: str) -> Any:
        """Answer `body` for `asker` (the caller's rater identity: only they may rate the answer)."""
        tasks = await self.tasks()
        task, _, version = body.model.partition("@")
        if task not in tasks:
            return self._reject(404, f"The model `{body.model}` does not exist; models are task names: "
                                f"{', '.join(sorted(tasks))}", "model", "model_not_found")
        if version and not re.fullmatch(rf"{re.escape(task)}-v[0-9]{{1,9}}", version):
            return self._reject(404, f"The model `{body.model}` does not exist: a pinned model is `{task}@{task}-v<N>`",
                                "model", "model_not_found")
        limits = self.settings.serving
        chars = sum(len(m.content) for m in body.chat())
        if chars > limits.max_prompt_chars:
            return self._reject(400, f"the messages are {chars} characters; the limit is {limits.max_prompt_chars}",
                                "messages", "context_length_exceeded")
        for field in ("max_completion_tokens", "max_tokens"):
            if (getattr(body, field) or 0) > limits.max_tokens_limit:
                return self._reject(400, f"{field} must be <= {limits.max_tokens_limit}", field)
        asked = body.max_completion_tokens or body.max_tokens
        options = SamplingOptions(
            max_tokens=asked or min(tasks[task].max_new_tokens, limits.max_tokens_limit),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stops(),
            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        )
        if options.min_tokens > options.max_tokens:
            return self._reject(400, f"min_tokens ({options.min_tokens}) must be <= the answer's max tokens "
                                f"({options.max_tokens})", "min_tokens")
        request_id = uuid.uuid4().hex
        if body.stream:
            return await self._stream(body, task, version or None, options, request_id, asker)
        started = time.perf_counter()
        try:
            completion = await self.llm.generate(body.chat(), options, request_id, task, version or None, body.user)
        except REFUSALS as exc:
            return self._engine_refusal(exc, body.model)
        except Exception:  # engine or replica trouble is ours, not the caller's: 503, logged
            return self._unavailable(request_id)
        latency = time.perf_counter() - started
        await self._record(body, request_id, task, completion.adapter_version, completion.answer,
                           completion.reasoning, completion.usage, latency, asker)
        response = ChatCompletion(
            id=COMPLETION_ID_PREFIX + request_id, created=int(time.time()), model=completion.adapter_version,
            choices=[Choice(message=AssistantMessage(content=completion.answer,
                                                     reasoning_content=completion.reasoning,
                                                     reasoning=completion.reasoning),
                            finish_reason=completion.finish_reason)],
            usage=_usage(completion.usage),
        )
        return JSONResponse(response.model_dump(), headers={"x-flywheel-replica": completion.replica})

    def _unavailable(self, request_id: str) -> JSONResponse:
        log.exception("event=chat_failed request_id=%s", request_id)
        self.metrics.requests.labels(ROUTE, "503").inc()
        return openai_error(503, "the model could not answer right now; retry shortly", kind="server_error")

    def _engine_refusal(self, exc: Exception, model: str) -> JSONResponse:
        if isinstance(exc, UnknownTaskError):
            return self._reject(404, "the model is not loaded yet; retry in a few seconds", "model",
                                "model_not_found")
        if isinstance(exc, AdaptersBusyError):
            busy = self._reject(503, f"no room to load `{model}` now: every loaded model is answering requests; "
                                f"retry in {BUSY_RETRY_AFTER_S} s", "model", "models_busy")
            busy.headers["retry-after"] = str(BUSY_RETRY_AFTER_S)
            return busy
        if isinstance(exc, VersionNotFoundError | AdapterIntegrityError):  # details name registry paths: logs only
            log.info("event=pinned_refused model=%s error=%r", model, exc)
            return self._reject(404, f"The model `{model}` is not a servable version", "model", "model_not_found")
        return self._reject(400, client_message(exc), "messages", "context_length_exceeded")

    async def _stream(self, body: ChatCompletionRequest, task: str, version: str | None, options: SamplingOptions,
                      request_id: str, asker: str) -> Any:
        started = time.perf_counter()
        try:
            first, events = await open_stream(self.llm, body.chat(), options, request_id, task, version, body.user)
            self.metrics.first_token.labels(ROUTE, first.adapter_version).observe(time.perf_counter() - started)
        except REFUSALS as exc:
            return self._engine_refusal(exc, body.model)
        except Exception:  # StopAsyncIteration included: nothing came back
            return self._unavailable(request_id)
        completion_id = COMPLETION_ID_PREFIX + request_id
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: Delta, *, finish: str | None = None, model: str = first.adapter_version) -> str:
            payload = ChatCompletionChunk(id=completion_id, created=created, model=model,
                                          choices=[ChunkChoice(delta=delta, finish_reason=finish)])
            return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"

        async def sse() -> AsyncIterator[str]:
            reasoning, answer = [], []
            yield chunk(Delta(role="assistant", content=""))
            event = first
            try:
                async for event in events:
                    if event.reasoning:
                        reasoning.append(event.reasoning)
                        yield chunk(Delta(reasoning_content=event.reasoning, reasoning=event.reasoning))
                    if event.answer:
                        answer.append(event.answer)
                        yield chunk(Delta(content=event.answer))
            except Exception as exc:  # the stream broke after it began: say so in-band, log the details
                log.exception("event=chat_stream_failed request_id=%s", request_id)
                self.metrics.requests.labels(ROUTE, "stream_error").inc()
                error = OpenAIError(error=OpenAIErrorBody(message=f"the stream was interrupted ({type(exc).__name__})",
                                                          type="server_error"))
                yield f"data: {error.model_dump_json()}\n\n"
                yield "data: [DONE]\n\n"
                return
            usage = event.usage or Usage(prompt_tokens=0, completion_tokens=0)
            yield chunk(Delta(), finish=event.finish_reason)
            if include_usage:
                final = ChatCompletionChunk(id=completion_id, created=created, model=first.adapter_version,
                                            choices=[], usage=_usage(usage))
                yield f"data: {final.model_dump_json(exclude_none=True)}\n\n"
            yield "data: [DONE]\n\n"
            await self._record(body, request_id, task, first.adapter_version, "".join(answer), "".join(reasoning),
                               usage, time.perf_counter() - started, asker)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"x-flywheel-replica": first.replica, "cache-control": "no-cache"})

    async def _record(self, body: ChatCompletionRequest, request_id: str, task: str, version: str, answer: str,
                      reasoning: str, usage: Usage, latency: float, asker: str) -> None:
        self.metrics.requests.labels(ROUTE, "200").inc()
        self.metrics.latency.labels(ROUTE, version).observe(latency)
        self.metrics.tokens.labels("prompt", version).inc(usage.prompt_tokens)
        self.metrics.tokens.labels("completion", version).inc(usage.completion_tokens)
        request_log.info("event=chat request_id=%s task=%s version=%s stream=%s tokens=%d ms=%.1f", request_id, task,
                 version, body.stream, usage.completion_tokens, latency * 1000)
        await self.publish(PredictionEvent(
            request_id=request_id, task=task,
            messages=[Message(role=m.role, content=m.content) for m in body.chat()],
            answer=answer, reasoning=reasoning, adapter_version=version, latency_ms=round(latency * 1000, 2),
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, asker=asker,
        ))
