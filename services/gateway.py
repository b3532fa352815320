"""The HTTP face of flywheel: a FastAPI app as the Ray Serve ingress. Routes stay thin.

The path of one /predict call: validate (protocol.py) → check sizes against config → LLM deployment
(llm_server.py: adapter slot → engine) → response naming the adapter version that produced it, and a
prediction event on the feedback bus. The path of one rating: POST /feedback → validate
(feedback/schemas.py) → feedback event on the bus → 202; the curator joins it to its prediction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, Generic, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from feedback import (
    FeedbackAccepted,
    FeedbackEvent,
    FeedbackRequest,
    PredictionEvent,
    build_bus,
    mask_event,
    overall,
    read_curators,
    read_health,
)
from feedback.dataset import canary_ratings, curated_dataset
from feedback.oversight import (
    Lineage,
    PendingCorrection,
    Retraction,
    author_of,
    judge,
    lineage,
    retract,
    review_queue,
)
from feedback.pii import pseudonym
from feedback.review import Judgement
from feedback.schemas import Message
from flywheel.auth import Caller, Scope
from flywheel.canary import CanaryReview, NoCanaryError, decide_by_hand, review
from flywheel.config import Settings
from flywheel.logs import REQUEST_LOGGER, configure_logging, configure_request_log
from flywheel.r1 import split_reasoning
from flywheel.registry import (
    AdapterIntegrityError,
    AdapterManifest,
    HistoryEntry,
    RegistryError,
    UnknownTaskError,
    VersionNotFoundError,
    known_tasks,
    registry_for,
)
from flywheel.runs import RetrainBusyError, RunStore
from flywheel.tasks import TaskName, TaskSpec
from services.access import Access, Denied
from services.adapters import BUSY_RETRY_AFTER_S, AdaptersBusyError
from services.body_limit import BodySizeLimit
from services.console import ConsoleState
from services.console import install as install_console
from services.engines.protocol import PromptTooLongError, SamplingOptions
from services.llm_client import LLMClient, LocalLLM, RemoteLLM, open_stream
from services.metrics import GatewayMetrics, OpsCollector, RecentAnswers, ReplicaCollector
from services.openai_api import ChatCompletions, openai_error
from services.openai_protocol import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList, OpenAIError
from services.protocol import (
    AdminStatus,
    AliasMove,
    CanaryState,
    Completion,
    ErrorResponse,
    FeedbackHealth,
    HealthResponse,
    LoopHealth,
    PredictRequest,
    PredictResponse,
    ReviewDecision,
    ReviewResult,
    StreamEvent,
    TaskHealth,
    Usage,
    client_message,
)
from services.status_board import get_board, version_figures

log = logging.getLogger("flywheel.gateway")
request_log = logging.getLogger(REQUEST_LOGGER)
LINEAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")  # versions, request ids and event ids: nothing else is looked up
RECENT_FEEDBACK = 100_000  # feedback events this replica remembers the author of
TASKS_TTL_S = 2.0  # how stale the gateway's view of tasks and aliases may be (new tasks come from `flywheel train`)


T = TypeVar("T")


class TtlCache(Generic[T]):
    """What `read` (blocking registry I/O, run in a worker thread) returned, read again once `ttl_s` has passed."""

    def __init__(self, read: Callable[[], T], ttl_s: float) -> None:
        self.read = read
        self.ttl_s = ttl_s
        self._value: T | None = None
        self._read_at = -math.inf
        self._lock = asyncio.Lock()  # a burst of callers after expiry waits on one read

    async def get(self) -> T:
        async with self._lock:
            if time.monotonic() - self._read_at > self.ttl_s:
                self._value = await asyncio.to_thread(self.read)
                self._read_at = time.monotonic()
        return self._value  # type: ignore[return-value]  # set by the read above

api = FastAPI(title="flywheel", description="Serve LoRA-tuned R1-distilled models; learn from feedback.")
MAX_BODY_BYTES = 1 << 20  # far above any body the size limits allow; refused before anything is parsed


api.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)


def _console() -> ConsoleState:
    """This replica's console (the gateway instance Serve runs here holds it)."""
    return serve.get_replica_context().servable_object.console


install_console(api, _console)  # /console: the pages ops use, behind a login with an admin key


def _documented(**codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error codes a route really returns, all with the ErrorResponse body."""
    return {int(code.removeprefix("e")): {"model": ErrorResponse, "description": text} for code, text in codes.items()}


INVALID = "The body is not valid JSON or breaks the schema; `detail` names each field."
TOO_LARGE = "The body is over the gateway's size cap."
AUTH = {"e401": "No key (`auth.mode: keys`), or an unknown or revoked one: `Authorization: Bearer <key>`.",
        "e403": "The key lacks the route's scope.", "e429": "Over the key's rate limit; see `Retry-After`."}
ADMIN = {**AUTH, "e401": "Missing or wrong admin key or token, or none configured."}


def _document_limits(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write the configured size limits into the OpenAPI document, so what it allows is what the app accepts."""
    models = schema["components"]["schemas"]

    def cap(model: str, field: str, key: str, value: int) -> None:
        prop = models[model]["properties"][field]
        for branch in (prop, *prop.get("anyOf", [])):
            if branch.get("type") in ("string", "integer"):
                branch[key] = value

    serving, feedback = settings.serving, settings.feedback
    cap("PredictRequest", "prompt", "maxLength", serving.max_prompt_chars)
    cap("Message", "content", "maxLength", serving.max_prompt_chars)
    cap("ChatTurn", "content", "maxLength", serving.max_prompt_chars)
    cap("TextPart", "text", "maxLength", serving.max_prompt_chars)
    for model, field in (("PredictRequest", "max_tokens"), ("ChatCompletionRequest", "max_tokens"),
                         ("ChatCompletionRequest", "max_completion_tokens")):
        cap(model, field, "maximum", serving.max_tokens_limit)
    cap("FeedbackRequest", "correction", "maxLength", feedback.max_correction_chars)
    cap("FeedbackRequest", "comment", "maxLength", feedback.max_comment_chars)
    # a real model name, so clients (and fuzzers) reading the document reach a task
    models["ChatCompletionRequest"]["properties"]["model"]["examples"] = [settings.default_task]
    return schema


def _error(status: int, errors: list[dict[str, str]]) -> JSONResponse:
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse(status_code=status, content={"error": message, "detail": errors})


def _openai_route(request: Request) -> bool:
    """Whether the request is for /v1/* (under whatever route prefix the app is deployed at)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    return "/v1/" in path.removeprefix(root)


def _is_type_tag(part: object) -> bool:
    """pydantic's names for the members of a union (`constrained-str`, `none`, `function-before[…]`):
    internals that say nothing to a client about which field was wrong."""
    text = str(part)
    return isinstance(part, str) and (text in {"none", "str", "int", "float", "bool", "list", "dict"}
                                      or any(c in text for c in "[]-("))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Framework errors (a body that is not even text, an unknown path) in the same shapes as ours."""
    unreadable = exc.status_code == 400 and "parsing the body" in str(exc.detail)
    if _openai_route(request):
        response = openai_error(400 if unreadable else exc.status_code, "the body is not valid JSON" if unreadable
                                else str(exc.detail), param="body" if unreadable else None)
        response.headers.update(getattr(exc, "headers", None) or {})
        return response
    if unreadable:
        return _error(422, [{"field": "body", "message": "the body is not valid JSON", "type": "json_invalid"}])
    headers = dict(getattr(exc, "headers", None) or {})  # e.g. 405's Allow
    if exc.status_code == 405:  # Starlette names the first route of the path only; list every one's methods
        methods = {m for route in request.app.routes if isinstance(route, APIRoute)
                   and route.matches(request.scope)[0] != Match.NONE for m in route.methods}
        headers["allow"] = ", ".join(sorted(methods)) or headers.get("allow", "")
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body" and not _is_type_tag(part)]
        if err.get("type") == "json_invalid":  # loc holds a character offset, not a field
            loc = []
        errors.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid"),
                       "type": err.get("type", "")})
    if _openai_route(request):  # OpenAI clients expect their error shape, with 400
        first = errors[0]
        return openai_error(400, "; ".join(f"{e['field']}: {e['message']}" for e in errors), param=first["field"],
                            code=first["type"] or None)
    return _error(422, errors)


def _actor(caller: Caller, body: AliasMove) -> str:
    """Who moved an alias: the key that did it (a body's `actor` is a note beside it, never the identity)."""
    return caller.principal if body.actor == AliasMove.model_fields["actor"].default else (
        f"{caller.principal} for {body.actor}")


def _without_failure_details(replica: dict[str, Any]) -> dict[str, Any]:
    """/healthz is unauthenticated: a failed swap shows its version and kind; the message (which may
    name registry paths) stays in the logs and behind the admin token (/admin/status)."""

    def public(state: dict[str, Any]) -> dict[str, Any]:
        failure = state.get("last_failure")
        return {**state, "last_failure": failure and {k: failure[k] for k in ("version", "kind")}}

    return {**public(replica), "tasks": {task: public(state) for task, state in replica.get("tasks", {}).items()}}


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway:
    def __init__(self, llm: DeploymentHandle | LocalLLM, settings: dict[str, Any], loop: DeploymentHandle | None = None
                 ) -> None:
        configure_logging()
        self.settings = Settings.from_shared(settings)
        configure_request_log(self.settings.serving.request_log, self.settings.home / "logs")
        self.llm: LLMClient = llm if isinstance(llm, LocalLLM) else RemoteLLM(llm)  # Serve hands us the handle
        self.loop = loop
        self.registry = registry_for(self.settings)
        self._cache_registry_views()
        self.board = get_board(self.settings.registry_uri, self.settings.serving.alias)
        self.metrics = GatewayMetrics()
        self.bus = build_bus(self.settings)  # publish() never waits on a broker: a spool absorbs outages
        self._replicas: list[dict[str, Any]] = []
        self.answers = RecentAnswers()
        self.metrics.watch(ReplicaCollector(lambda: self._replicas, self._champion))
        runs = RunStore.for_settings(self.settings)
        self.access = Access(self.settings)
        self.console = ConsoleState(self.settings, self.access)
        self.reviews = curated_dataset(self.settings).reviews
        self._recent_feedback: OrderedDict[str, str] = OrderedDict()  # event id -> rater, for DELETE /feedback
        self.metrics.watch(OpsCollector(self.bus.stats, lambda: read_health(self.settings), runs.summary))
        self.chat = ChatCompletions(self.llm, self.settings, self._known_tasks, self._publish, self.metrics)
        api.openapi_schema = _document_limits(api.openapi(), self.settings)

    def _champion(self) -> str | None:
        return self.registry.alias(self.settings.serving.alias)

    def _cache_registry_views(self) -> None:
        """What every request's task check and the unauthenticated /healthz and /v1/models read: from the
        registry (and the curators' reports on its store) at most once per TASKS_TTL_S, however often they are
        called."""
        self._tasks = TtlCache(lambda: known_tasks(self.settings), TASKS_TTL_S)
        self._champions = TtlCache(self._read_champions, TASKS_TTL_S)
        self._ready_versions = TtlCache(self._read_ready_versions, TASKS_TTL_S)
        self._feedback_view = TtlCache(self._feedback_health, TASKS_TTL_S)

    async def _known_tasks(self) -> dict[str, TaskSpec]:
        return await self._tasks.get()

    def _read_champions(self) -> dict[str, str | None]:
        alias = self.settings.serving.alias
        return {task: registry_for(self.settings, task).alias(alias) for task in known_tasks(self.settings)}

    def _read_ready_versions(self) -> dict[str, list[AdapterManifest]]:
        return {task: [m for m in registry_for(self.settings, task).versions() if m.status == "ready"]
                for task in known_tasks(self.settings)}

    async def _refresh_replicas(self) -> list[dict[str, Any]]:
        self._replicas = await self.board.snapshot.remote()
        return self._replicas

    @api.post("/predict", response_model=PredictResponse, responses={
        200: {"description": "The answer, or with `stream: true` server-sent events: `data: {\"reasoning\", "
                             "\"answer\"}` deltas as the model makes them, then the whole response with "
                             "`\"done\": true`.", "content": {"text/event-stream": {}}},
        **_documented(**AUTH, e400="The prompt is longer than the configured limit or than the model's context.",
                      e404="Unknown task, or a `version` that is not one of the task's.", e413=TOO_LARGE,
                      e422=INVALID, e503="The model could not answer right now; retry.")})
    async def predict(self, body: PredictRequest, request: Request) -> Any:
        started = time.perf_counter()
        caller = await self._admit(request, "predict")
        if isinstance(caller, JSONResponse):
            return caller
        asker = caller.vouching_for(pseudonym(body.user)).rater
        limits = self.settings.serving
        if body.prompt_chars() > limits.max_prompt_chars:
            field = "prompt" if body.prompt is not None else "messages"
            return self._reject(400, field, f"is {body.prompt_chars()} characters; the limit is "
                                f"{limits.max_prompt_chars}")
        tasks = await self._known_tasks()
        task = body.task or self.settings.default_task
        if task not in tasks:
            return self._reject(404, "task", f"unknown task {task!r}; known tasks: {', '.join(sorted(tasks))}")
        if body.version is not None and not body.version.startswith(f"{task}-v"):
            return self._reject(404, "version", f"{body.version} is not a version of task {task!r}")
        if body.max_tokens is not None and body.max_tokens > limits.max_tokens_limit:
            return self._reject(422, "max_tokens", f"must be <= {limits.max_tokens_limit}")
        max_tokens = body.max_tokens or min(tasks[task].max_new_tokens, limits.max_tokens_limit)
        request_id = uuid.uuid4().hex
        options = SamplingOptions(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
        )
        try:
            if body.stream:
                first, events = await open_stream(self.llm, body.chat(), options, request_id, task, body.version,
                                                  body.user)
                self.metrics.first_token.labels("/predict", first.adapter_version).observe(
                    time.perf_counter() - started)
                return StreamingResponse(self._predict_events(body, task, request_id, started, events, asker),
                                         media_type="text/event-stream",
                                         headers={"x-flywheel-replica": first.replica, "cache-control": "no-cache"})
            completion = await self.llm.generate(body.chat(), options, request_id, task, body.version, body.user)
        except PromptTooLongError as exc:
            field = "prompt" if body.prompt is not None else "messages"
            return self._reject(400, field, client_message(exc))
        except (VersionNotFoundError, AdapterIntegrityError) as exc:  # the details name registry paths: logs only
            log.info("event=pinned_refused version=%s error=%r", body.version, exc)
            return self._reject(404, "version", f"{body.version} is not a servable version of task {task!r}")
        except UnknownTaskError:  # registered a moment ago: this replica has not seen it yet
            return self._reject(404, "task", f"task {task!r} is not loaded yet; retry in a few seconds")
        except AdaptersBusyError:
            self.metrics.requests.labels("/predict", "503").inc()
            return JSONResponse(status_code=503, headers={"retry-after": str(BUSY_RETRY_AFTER_S)}, content={
                "error": f"no room to load {body.version or task} now: every loaded version is answering "
                         f"requests; retry in {BUSY_RETRY_AFTER_S} s", "request_id": request_id})
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # engine or replica trouble is ours, not the caller's: 503, logged
            log.exception("event=predict_failed request_id=%s", request_id)
            self.metrics.requests.labels("/predict", "503").inc()
            return JSONResponse(status_code=503, content={
                "error": f"the model could not answer right now ({type(exc).__name__}); retry shortly",
                "request_id": request_id,
            })
        response = await self._answered(body, request_id, completion, started, asker)
        return JSONResponse(response.model_dump(), headers={"x-flywheel-replica": completion.replica})

    async def _predict_events(self, body: PredictRequest, task: str, request_id: str, started: float,
                              events: AsyncIterator[StreamEvent], asker: str) -> AsyncIterator[str]:
        reasoning, answer = [], []
        try:
            async for event in events:
                reasoning.append(event.reasoning)
                answer.append(event.answer)
                if event.reasoning or event.answer:
                    yield f"data: {json.dumps({'reasoning': event.reasoning, 'answer': event.answer})}\n\n"
        except Exception as exc:  # the stream broke after it began: say so in-band, log the details
            log.exception("event=predict_stream_failed request_id=%s", request_id)
            self.metrics.requests.labels("/predict", "stream_error").inc()
            yield f"data: {json.dumps({'error': f'the stream was interrupted ({type(exc).__name__})'})}\n\n"
            return
        completion = Completion(task=task, adapter_version=event.adapter_version, replica=event.replica,
                                answer="".join(answer), reasoning="".join(reasoning), truncated=event.truncated,
                                finish_reason=event.finish_reason,
                                usage=event.usage or Usage(prompt_tokens=0, completion_tokens=0))
        response = await self._answered(body, request_id, completion, started, asker)
        yield f"data: {json.dumps({**response.model_dump(), 'done': True})}\n\n"

    async def _answered(self, body: PredictRequest, request_id: str, completion: Completion, started: float,
                        asker: str) -> PredictResponse:
        """Count, log and publish one answer; the response that says it."""
        latency = time.perf_counter() - started
        version = completion.adapter_version
        self.metrics.requests.labels("/predict", "200").inc()
        self.metrics.latency.labels("/predict", version).observe(latency)
        self.metrics.tokens.labels("prompt", version).inc(completion.usage.prompt_tokens)
        self.metrics.tokens.labels("completion", version).inc(completion.usage.completion_tokens)
        request_log.info("event=predict request_id=%s task=%s version=%s replica=%s tokens=%d truncated=%s stream=%s "
                 "ms=%.1f", request_id, completion.task, version, completion.replica,
                 completion.usage.completion_tokens, completion.truncated, body.stream, latency * 1000)
        response = PredictResponse(
            request_id=request_id,
            task=completion.task,
            adapter_version=version,
            answer=completion.answer,
            reasoning=completion.reasoning,
            truncated=completion.truncated,
            finish_reason=completion.finish_reason,
            usage=completion.usage,
            latency_ms=round(latency * 1000, 2),
        )
        await self._publish(PredictionEvent(
            request_id=request_id,
            task=completion.task,
            prompt=body.prompt,
            messages=[Message(role=m.role, content=m.content) for m in body.messages] if body.messages else None,
            answer=completion.answer,
            reasoning=completion.reasoning,
            adapter_version=version,
            latency_ms=response.latency_ms,
            prompt_tokens=completion.usage.prompt_tokens,
            completion_tokens=completion.usage.completion_tokens,
            asker=asker,
        ))
        return response

    def _reject(self, status: int, field: str, message: str, route: str = "/predict") -> JSONResponse:
        self.metrics.requests.labels(route, str(status)).inc()
        return _error(status, [{"field": field, "message": message, "type": "limit"}])

    async def _admit(self, request: Request, scope: Scope) -> Caller | JSONResponse:
        """The caller, or the 401/403/429 that turns it away (see services/access.py)."""
        try:
            return await self.access.admit(request, scope)
        except Denied as exc:
            root = request.scope.get("root_path", "")
            self.metrics.requests.labels(request.url.path.removeprefix(root), str(exc.status)).inc()
            log.info("event=denied status=%d path=%s why=%r", exc.status, request.url.path, exc.message)
            return exc.response(openai=_openai_route(request))

    def _throttled(self, request: Request) -> JSONResponse | None:
        """The open routes (/healthz, /metrics) need no key, but are rate-limited per client address too."""
        try:
            self.access.throttle(request)
        except Denied as exc:
            self.metrics.requests.labels(request.url.path.removeprefix(request.scope.get("root_path", "")),
                                         str(exc.status)).inc()
            return exc.response(openai=False)
        return None

    async def _publish(self, event: PredictionEvent | FeedbackEvent) -> bool:
        if isinstance(event, PredictionEvent):
            self.answers.remember(event.request_id, event.task or self.settings.default_task, event.adapter_version,
                                  event.asker)
        else:
            self.metrics.count_feedback(*self.answers.who(event.request_id), event.rating, event.thumb,
                                        event.correction)
        if self.settings.feedback.mask_at_source:  # personal data never reaches a log, a spool or Kafka
            event = await asyncio.to_thread(mask_event, event)  # up to a prompt's worth of text: off the event loop
        stored = self.bus.publish(event)
        self.metrics.events.labels(event.event_type, "stored" if stored else "lost").inc()
        if not stored:
            log.error("event=bus_publish_failed type=%s request_id=%s", event.event_type, event.request_id)
        return stored

    @api.post("/feedback", status_code=202, response_model=FeedbackAccepted, responses=_documented(
        **{**AUTH, "e403": AUTH["e403"] + " Or the caller is not the one who asked for the answer (`feedback.rater`)."},
        e413=TOO_LARGE, e422=INVALID + " Or the correction is not one of the labels of the classification task "
        "that answered (the message names them).", e503="The feedback could not be stored; retry."))
    async def feedback(self, body: FeedbackRequest, request: Request) -> Any:
        caller = await self._admit(request, "feedback")
        if isinstance(caller, JSONResponse):
            return caller
        caller = caller.vouching_for(pseudonym(body.user_id))
        asker = self.answers.asker(body.request_id)
        if self.settings.feedback.rater == "asker" and asker is not None and asker != caller.rater:
            self.metrics.requests.labels("/feedback", "403").inc()
            return JSONResponse(status_code=403, content={"error": "only the caller who asked for this answer may "
                                                                   "rate it"})
        limits = self.settings.feedback
        too_long = body.check_limits(limits.max_correction_chars, limits.max_comment_chars)
        if too_long:
            self.metrics.requests.labels("/feedback", "422").inc()
            return _error(422, [{"field": f, "message": m, "type": "limit"} for f, m in too_long])
        if body.correction is not None and (not_a_label := await self._not_a_label(body)):
            self.metrics.requests.labels("/feedback", "422").inc()
            log.info("event=feedback_refused request_id=%s why=%r", body.request_id, not_a_label)
            return _error(422, [{"field": "correction", "message": not_a_label, "type": "label"}])
        event = body.to_event(caller.rater, caller.authenticated, caller.end_user, caller.tenant)
        self._recent_feedback[event.event_id] = caller.rater
        while len(self._recent_feedback) > RECENT_FEEDBACK:
            self._recent_feedback.popitem(last=False)
        if not await self._publish(event):
            self.metrics.requests.labels("/feedback", "503").inc()
            return JSONResponse(status_code=503, content={"error": "feedback could not be stored; retry"})
        self.metrics.requests.labels("/feedback", "202").inc()
        request_log.info("event=feedback event_id=%s request_id=%s rating=%s thumb=%s correction=%s", event.event_id,
                 event.request_id, event.rating, event.thumb, event.correction is not None)
        return JSONResponse(status_code=202, content=FeedbackAccepted(event_id=event.event_id).model_dump())

    async def _not_a_label(self, body: FeedbackRequest) -> str | None:
        """Why a correction cannot teach the classification task that answered (None: it can, or the task is not
        known here: the retrain drops a correction that names no label)."""
        task = (await self._known_tasks()).get(self.answers.who(body.request_id)[0])
        if task is None or task.kind != "classification" or body.correction is None:
            return None
        answer = split_reasoning(body.correction)[1] if "</think>" in body.correction else body.correction
        if task.label_of(answer) is not None:
            return None
        return f"is not one of task {task.name!r}'s labels: {', '.join(task.labels)}"

    @api.post("/v1/chat/completions", response_model=ChatCompletion, responses={
        200: {"description": "A completion, or with `stream: true` server-sent `chat.completion.chunk` events "
                             "ending in `data: [DONE]`.", "content": {"text/event-stream": {}}},
        400: {"model": OpenAIError, "description": "Invalid request, or the prompt does not fit the context."},
        404: {"model": OpenAIError, "description": "Unknown model (models are task names)."},
        401: {"model": OpenAIError, "description": AUTH["e401"]},
        403: {"model": OpenAIError, "description": AUTH["e403"]},
        413: {"model": ErrorResponse, "description": TOO_LARGE},
        429: {"model": OpenAIError, "description": AUTH["e429"]},
        503: {"model": OpenAIError, "description": "The model could not answer right now."},
    })
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI-compatible chat: `model` is a task name; its champion answers."""
        caller = await self._admit(request, "predict")
        if isinstance(caller, JSONResponse):
            return caller
        return await self.chat(body, caller.vouching_for(pseudonym(body.user)).rater)

    @api.get("/v1/models", response_model=ModelList, responses={
        status: {"model": OpenAIError, "description": AUTH[f"e{status}"]} for status in (401, 403, 429)})
    async def models(self, request: Request) -> Any:
        """Every task (its champion answers), and each of its ready versions as `task@version`."""
        caller = await self._admit(request, "predict")
        if isinstance(caller, JSONResponse):
            return caller
        base = self.settings.model.quantized_base or self.settings.model.base
        ready = await self._ready_versions.get()
        now = int(time.time())
        cards = []
        for task in sorted(ready):
            cards.append(ModelCard(id=task, created=now, parent=base, root=base))
            cards += [ModelCard(id=f"{task}@{m.version}", created=int(m.created_at.timestamp()), parent=task,
                                root=base) for m in ready[task]]
        return ModelList(data=cards)

    @api.get("/healthz", response_model=HealthResponse, responses=_documented(e429=AUTH["e429"]))
    async def healthz(self, request: Request) -> Any:
        if denied := self._throttled(request):
            return denied
        replicas = await self._refresh_replicas()
        champions = await self._champions.get()
        health: dict[str, TaskHealth] = {}
        healthy = bool(replicas)
        for task, champion in champions.items():
            states = [r.get("tasks", {}).get(task, {}) for r in replicas]
            health[task] = TaskHealth(champion=champion, serving=sorted({s.get("active", "-") for s in states}))
            # a replica off its task's champion, or whose last swap failed, is degraded
            healthy = healthy and all(
                (champion is None or s.get("active") == champion) and not s.get("last_failure") for s in states)
        default = health.get(self.settings.default_task, TaskHealth(champion=None, serving=[]))
        return HealthResponse(
            status="ok" if healthy else "degraded",
            champion=default.champion,
            serving=default.serving,
            tasks=health,
            engine=self.settings.serving.engine,
            base_model=self.settings.model.quantized_base or self.settings.model.base,
            quantization=next((r["quantization"] for r in replicas if r.get("quantization")), None),
            replicas=[_without_failure_details(r) for r in replicas],
            feedback=await self._feedback_view.get(),
            loop=await self._loop_health(),
        )

    async def _loop_health(self) -> LoopHealth | None:
        if self.loop is None:
            return None
        try:
            return LoopHealth.model_validate(await asyncio.wait_for(self.loop.status.remote(), timeout=5))
        except Exception:  # its replica is restarting: serving goes on, /healthz says so
            log.warning("event=loop_keeper_unreachable", exc_info=True)
            return LoopHealth(role="unreachable")

    def _feedback_health(self) -> FeedbackHealth:
        bus = self.bus.stats()
        curators = read_curators(self.settings)
        curator = overall(curators)
        return FeedbackHealth(backend=bus["backend"], connected=bus.get("connected", True), pending=bus["pending"],
                              curator=curator.state if curator else None,
                              curators_running=sum(h.state == "running" for h in curators))

    # -- admin: token-protected operations ----------------------------------------------------------

    @api.post("/admin/retrain", status_code=202, responses=_documented(
        **ADMIN, e404="Unknown task.", e409="A retrain is already running.", e422=INVALID))
    async def admin_retrain(self, request: Request, task: TaskName | None = None) -> Any:
        caller = await self._admit(request, "admin")
        if isinstance(caller, JSONResponse):
            return caller
        task = task or self.settings.default_task
        if task not in await self._known_tasks():
            return JSONResponse(status_code=404, content={"error": f"unknown task {task!r}"})
        store = RunStore.for_settings(self.settings)
        try:
            record = await asyncio.to_thread(store.launch_retrain, self.settings, "admin", task)
        except RetrainBusyError as exc:
            return JSONResponse(status_code=409, content={"error": str(exc)})
        log.info("event=retrain_triggered run_id=%s task=%s by=admin", record.run_id, task)
        return JSONResponse(status_code=202, content={"run_id": record.run_id, "task": task, "state": record.state})

    @api.post("/admin/promote", response_model=HistoryEntry, responses=_documented(
        **ADMIN, e404="No such version.", e409="The version cannot be promoted (rejected, or another base).",
        e422=INVALID))
    async def admin_promote(self, request: Request, body: AliasMove) -> Any:
        caller = await self._admit(request, "admin")
        if isinstance(caller, JSONResponse):
            return caller
        if not body.version:
            return _error(422, [{"field": "version", "message": "required", "type": "missing"}])
        version = body.version
        registry = registry_for(self.settings, version.rsplit("-v", 1)[0]) if "-v" in version else self.registry
        return await self._move_alias(lambda: registry.promote(
            version, actor=_actor(caller, body), reason=body.reason or "promoted via /admin/promote",
            expected_champion=body.expected_champion or ...))

    @api.post("/admin/rollback", response_model=HistoryEntry, responses=_documented(
        **ADMIN, e404="No such task or version.", e409="Nothing to roll back to.", e422=INVALID))
    async def admin_rollback(self, request: Request, body: AliasMove) -> Any:
        caller = await self._admit(request, "admin")
        if isinstance(caller, JSONResponse):
            return caller
        registry = registry_for(self.settings, body.task) if body.task else self.registry
        return await self._move_alias(lambda: registry.rollback(
            actor=_actor(caller, body), reason=body.reason or "rolled back via /admin/rollback",
            expected_champion=body.expected_champion or ...))

    async def _move_alias(self, move: Callable[[], HistoryEntry]) -> JSONResponse:
        try:
            entry = await asyncio.to_thread(move)
        except VersionNotFoundError as exc:
            return JSONResponse(status_code=404, content={"error": str(exc)})
        except RegistryError as exc:
            return JSONResponse(status_code=409, content={"error": str(exc)})
        log.info("event=alias_moved alias=%s %s->%s by=%s", entry.alias, entry.previous, entry.version, entry.actor)
        return JSONResponse(entry.model_dump(mode="json"))

    @api.get("/admin/canary", response_model=CanaryState, responses=_documented(
        **ADMIN, e404="Unknown task.", e422=INVALID))
    async def admin_canary(self, request: Request, task: TaskName | None = None) -> Any:
        """The task's canary, as the controller sees it: arms, share, the test's estimate and interval, what next."""
        return await self._canary(request, task, None)

    @api.post("/admin/canary/promote", response_model=CanaryState, responses=_documented(
        **ADMIN, e404="Unknown task.", e409="The task runs no canary.", e422=INVALID))
    async def admin_canary_promote(self, request: Request, task: TaskName | None = None) -> Any:
        """Make the task's canary its champion now, whatever the ratings say."""
        return await self._canary(request, task, "promote")

    @api.post("/admin/canary/abort", response_model=CanaryState, responses=_documented(
        **ADMIN, e404="Unknown task.", e409="The task runs no canary.", e422=INVALID))
    async def admin_canary_abort(self, request: Request, task: TaskName | None = None) -> Any:
        """Roll the task's canary back now: its share goes to 0."""
        return await self._canary(request, task, "rollback")

    async def _canary(self, request: Request, task: str | None, verdict: Literal["promote", "rollback"] | None
                      ) -> Any:
        caller = await self._admit(request, "admin")
        if isinstance(caller, JSONResponse):
            return caller
        task = task or self.settings.default_task
        if task not in await self._known_tasks():
            return JSONResponse(status_code=404, content={"error": f"unknown task {task!r}"})
        figures = version_figures(await self._refresh_replicas())
        registry = registry_for(self.settings, task)

        def act() -> CanaryReview | None:
            ratings = partial(canary_ratings(self.settings), task)
            if verdict is None:
                return review(registry, self.settings.canary, ratings, figures)
            return decide_by_hand(registry, self.settings.canary, ratings, verdict, actor=caller.principal,
                                  via="admin API", figures=figures)

        try:
            decided = await asyncio.to_thread(act)
        except NoCanaryError as exc:
            return JSONResponse(status_code=409, content={"error": str(exc)})
        return CanaryState(task=task, review=decided)

    @api.get("/admin/feedback/review", response_model=list[PendingCorrection], responses=_documented(
        **ADMIN, e422=INVALID))
    async def admin_review_queue(self, request: Request, task: TaskName | None = None) -> Any:
        """Corrections a retrain will not learn until approved: anonymous, conflicting, screened out, low trust."""
        caller = await self._admit(request, "admin")
        if isinstance(caller, JSONResponse):
            return caller
        queue = await asyncio.to_thread(review_queue, self.settings, task)
        return JSONResponse([p.model_dump(mode="json") for p in queue])

    @api.post("/admin/feedback/review", response_model=ReviewResult, responses=_documented(
        **ADMIN, e422=INVALID))
    async def admin_review(self, request: Request, body: ReviewDecision) -> Any:
        """Approve (the rows train as `reviewed`) or reject (they never train) pending corrections."""
        caller = await self._admit(request, "admin")
        if isinstance(caller, JSONResponse):
            return caller

        def decide() -> ReviewResult:
            approved, unknown_a = judge(self.settings, body.approve, "approve", caller.principal, body.reason)
            rejected, unknown_r = judge(self.settings, body.reject, "reject", caller.principal, body.reason)
            return ReviewResult(approved=approved, rejected=rejected, unknown=unknown_a + unknown_r)

        result = await asyncio.to_thread(decide)
        log.info("event=feedback_reviewed by=%s approved=%d rejected=%d", caller.principal, len(result.approved),
                 len(result.rejected))
        return JSONResponse(result.model_dump())

    @api.get("/admin/lineage/{identifier}", response_model=Lineage, responses=_documented(
        **ADMIN, e404="No such version, request or event."))
    async def admin_lineage(self, request: Request, identifier: str) -> Any:
        """What made a version; which version answered a request and what its feedback trained; where an event went."""
        caller = await self._admit(request, "admin")
        if isinstance(caller, JSONResponse):
            return caller
        if not LINEAGE_ID.fullmatch(identifier):
            return JSONResponse(status_code=404, content={"error": "not a version, request id or event id"})
        try:
            found = await asyncio.to_thread(lineage, self.settings, identifier)
        except LookupError as exc:
            return JSONResponse(status_code=404, content={"error": str(exc)})
        return JSONResponse(found.model_dump(mode="json"))

    @api.delete("/feedback/{event_id}", response_model=Retraction, responses=_documented(
        **AUTH, e404="No curated feedback with this id by this caller (it may not be curated yet: retry)."))
    async def retract_feedback(self, request: Request, event_id: str) -> Any:
        """Take back your own feedback (or, with `act-for-users`, feedback you gave for one of your users): it is
        never trained on again; the answer names the versions that learned it."""
        caller = await self._admit(request, "feedback")
        if isinstance(caller, JSONResponse):
            return caller
        try:  # a lookup scans the curated dataset: one caller cannot make it do so often
            self.access.within(caller, self.settings.auth.retract_rate, "retract")
        except Denied as exc:
            return exc.response(openai=False)

        def retract_own() -> Retraction | None:
            if not LINEAGE_ID.fullmatch(event_id):
                return None
            recent = self._recent_feedback.get(event_id)  # sent here lately, maybe not curated yet: a tombstone
            if recent is not None and caller.speaks_for(recent):
                self.reviews.append([Judgement(event_id=event_id, action="retract", by=caller.rater,
                                               reason="retracted by its author")])
                return Retraction(retracted=[event_id], unknown=[], trained={})
            if not caller.speaks_for(author_of(self.settings, event_id)):
                return None
            return retract(self.settings, [event_id], by=caller.rater, reason="retracted by its author")

        result = await asyncio.to_thread(retract_own)
        if result is None:
            return JSONResponse(status_code=404, content={"error": f"no curated feedback {event_id!r} of yours"})
        log.info("event=feedback_retracted event_id=%s by=%s", event_id, caller.rater)
        return JSONResponse(result.model_dump())

    @api.get("/admin/status", response_model=AdminStatus, responses=_documented(**ADMIN))
    async def admin_status(self, request: Request) -> Any:
        caller = await self._admit(request, "admin")
        if isinstance(caller, JSONResponse):
            return caller
        runs = await asyncio.to_thread(RunStore.for_settings(self.settings).list, 10)
        return {
            "champion": await asyncio.to_thread(self._champion),
            "replicas": await self._refresh_replicas(),
            "runs": [r.model_dump(mode="json") for r in runs],
        }

    def __del__(self) -> None:
        self.bus.close()  # flushes what is buffered; the spool/log keeps the rest for the next process

    @api.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text exposition.", "content": {"text/plain": {}}},
        **_documented(e429=AUTH["e429"])})
    async def metrics(self, request: Request) -> Response:
        if denied := self._throttled(request):
            return denied
        await self._refresh_replicas()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)
