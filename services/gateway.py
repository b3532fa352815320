"""The HTTP face of flywheel: a FastAPI app as the Ray Serve ingress. Routes stay thin.

The path of one /predict call: validate (protocol.py) → check sizes against config → LLM deployment
(llm_server.py: adapter slot → engine) → response naming the adapter version that produced it, and a
prediction event on the feedback bus. The path of one rating: POST /feedback → validate
(feedback/schemas.py) → feedback event on the bus → 202; the curator joins it to its prediction.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from feedback.bus import build_bus
from feedback.schemas import FeedbackAccepted, FeedbackEvent, FeedbackRequest, Message, PredictionEvent
from flywheel.config import Settings
from flywheel.logs import configure_logging
from flywheel.registry import HistoryEntry, Registry, RegistryError, VersionNotFoundError
from flywheel.runs import RetrainBusyError, RunStore, retrain_command
from services.engines.protocol import PromptTooLongError, SamplingOptions
from services.metrics import GatewayMetrics, ReplicaCollector
from services.protocol import AliasMove, HealthResponse, PredictRequest, PredictResponse
from services.status_board import get_board

log = logging.getLogger("flywheel.gateway")

api = FastAPI(title="flywheel", description="Serve LoRA-tuned R1-distilled models; learn from feedback.")


def _error(status: int, errors: list[dict[str, str]]) -> JSONResponse:
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse(status_code=status, content={"error": message, "detail": errors})


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if err.get("type") == "json_invalid":  # loc holds a character offset, not a field
            loc = []
        errors.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid"),
                       "type": err.get("type", "")})
    return _error(422, errors)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway:
    def __init__(self, llm: DeploymentHandle, settings: dict[str, Any]) -> None:
        configure_logging()
        self.llm = llm
        self.settings = Settings.model_validate(settings)
        self.registry = Registry(self.settings.registry_uri, self.settings.model.task)
        self.board = get_board(self.settings.registry_uri, self.settings.serving.alias)
        self.metrics = GatewayMetrics()
        self.bus = build_bus(self.settings)  # publish() never waits on a broker: a spool absorbs outages
        self._replicas: list[dict[str, Any]] = []
        self.metrics.watch_replicas(ReplicaCollector(lambda: self._replicas, self._champion))

    def _champion(self) -> str | None:
        return self.registry.alias(self.settings.serving.alias)

    async def _refresh_replicas(self) -> list[dict[str, Any]]:
        self._replicas = await self.board.snapshot.remote()
        return self._replicas

    @api.post("/predict", response_model=PredictResponse)
    async def predict(self, body: PredictRequest) -> Any:
        started = time.perf_counter()
        limits = self.settings.serving
        if body.prompt_chars() > limits.max_prompt_chars:
            field = "prompt" if body.prompt is not None else "messages"
            return self._reject(400, field, f"is {body.prompt_chars()} characters; the limit is "
                                f"{limits.max_prompt_chars}")
        max_tokens = body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens_limit:
            return self._reject(422, "max_tokens", f"must be <= {limits.max_tokens_limit}")
        request_id = uuid.uuid4().hex
        options = SamplingOptions(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
        )
        try:
            completion = await self.llm.generate.remote(body.chat(), options, request_id)
        except PromptTooLongError as exc:
            field = "prompt" if body.prompt is not None else "messages"
            return self._reject(400, field, str(exc))
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # engine or replica trouble is ours, not the caller's: 503, logged
            log.exception("event=predict_failed request_id=%s", request_id)
            self.metrics.requests.labels("/predict", "503").inc()
            return JSONResponse(status_code=503, content={
                "error": f"the model could not answer right now ({type(exc).__name__}); retry shortly",
                "request_id": request_id,
            })
        latency = time.perf_counter() - started
        version = completion.adapter_version
        self.metrics.requests.labels("/predict", "200").inc()
        self.metrics.latency.labels("/predict", version).observe(latency)
        self.metrics.tokens.labels("prompt", version).inc(completion.usage.prompt_tokens)
        self.metrics.tokens.labels("completion", version).inc(completion.usage.completion_tokens)
        log.info("event=predict request_id=%s version=%s replica=%s tokens=%d ms=%.1f", request_id,
                 version, completion.replica, completion.usage.completion_tokens, latency * 1000)
        response = PredictResponse(
            request_id=request_id,
            adapter_version=version,
            answer=completion.answer,
            reasoning=completion.reasoning,
            usage=completion.usage,
            latency_ms=round(latency * 1000, 2),
        )
        self._publish(PredictionEvent(
            request_id=request_id,
            prompt=body.prompt,
            messages=[Message(role=m.role, content=m.content) for m in body.messages] if body.messages else None,
            answer=completion.answer,
            reasoning=completion.reasoning,
            adapter_version=version,
            latency_ms=response.latency_ms,
            prompt_tokens=completion.usage.prompt_tokens,
            completion_tokens=completion.usage.completion_tokens,
        ))
        return JSONResponse(response.model_dump(), headers={"x-flywheel-replica": completion.replica})

    def _reject(self, status: int, field: str, message: str, route: str = "/predict") -> JSONResponse:
        self.metrics.requests.labels(route, str(status)).inc()
        return _error(status, [{"field": field, "message": message, "type": "limit"}])

    def _publish(self, event: PredictionEvent | FeedbackEvent) -> bool:
        stored = self.bus.publish(event)
        self.metrics.events.labels(event.event_type, "stored" if stored else "lost").inc()
        if not stored:
            log.error("event=bus_publish_failed type=%s request_id=%s", event.event_type, event.request_id)
        return stored

    @api.post("/feedback", status_code=202, response_model=FeedbackAccepted)
    async def feedback(self, body: FeedbackRequest) -> Any:
        limits = self.settings.feedback
        too_long = body.check_limits(limits.max_correction_chars, limits.max_comment_chars)
        if too_long:
            self.metrics.requests.labels("/feedback", "422").inc()
            return _error(422, [{"field": f, "message": m, "type": "limit"} for f, m in too_long])
        event = body.to_event()
        if not self._publish(event):
            self.metrics.requests.labels("/feedback", "503").inc()
            return JSONResponse(status_code=503, content={"error": "feedback could not be stored; retry"})
        self.metrics.requests.labels("/feedback", "202").inc()
        log.info("event=feedback event_id=%s request_id=%s rating=%s thumb=%s correction=%s", event.event_id,
                 event.request_id, event.rating, event.thumb, event.correction is not None)
        return JSONResponse(status_code=202, content=FeedbackAccepted(event_id=event.event_id).model_dump())

    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> HealthResponse:
        replicas = await self._refresh_replicas()
        champion = await asyncio.to_thread(self._champion)
        serving = sorted({r["active"] for r in replicas})
        healthy = bool(replicas) and all(
            r["active"] == champion and not r["last_failure"] for r in replicas
        ) if champion else bool(replicas)
        return HealthResponse(
            status="ok" if healthy else "degraded",
            champion=champion,
            serving=serving,
            engine=self.settings.serving.engine,
            base_model=self.settings.model.quantized_base or self.settings.model.base,
            quantization=next((r["quantization"] for r in replicas if r.get("quantization")), None),
            replicas=replicas,
        )

    # -- admin: token-protected operations ----------------------------------------------------------

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        token = self.settings.admin_token
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not token:
            return JSONResponse(status_code=401, content={"error": "admin routes are disabled: set admin_token"})
        if not hmac.compare_digest(given, token):
            return JSONResponse(status_code=401, content={"error": "missing or wrong admin token (Authorization: "
                                                                   "Bearer <token>)"})
        return None

    @api.post("/admin/retrain", status_code=202)
    async def admin_retrain(self, request: Request) -> Any:
        if denied := self._unauthorized(request):
            return denied
        store = RunStore(self.settings.home / "runs")
        try:
            record = await asyncio.to_thread(store.launch, retrain_command(self.settings, store.root), "admin")
        except RetrainBusyError as exc:
            return JSONResponse(status_code=409, content={"error": str(exc)})
        log.info("event=retrain_triggered run_id=%s by=admin", record.run_id)
        return JSONResponse(status_code=202, content={"run_id": record.run_id, "state": record.state})

    @api.post("/admin/promote")
    async def admin_promote(self, request: Request, body: AliasMove) -> Any:
        if denied := self._unauthorized(request):
            return denied
        if not body.version:
            return _error(422, [{"field": "version", "message": "required", "type": "missing"}])
        return await self._move_alias(lambda: self.registry.promote(
            body.version, actor=body.actor, reason=body.reason or "promoted via /admin/promote"))

    @api.post("/admin/rollback")
    async def admin_rollback(self, request: Request, body: AliasMove) -> Any:
        if denied := self._unauthorized(request):
            return denied
        return await self._move_alias(lambda: self.registry.rollback(
            actor=body.actor, reason=body.reason or "rolled back via /admin/rollback"))

    async def _move_alias(self, move: Callable[[], HistoryEntry]) -> JSONResponse:
        try:
            entry = await asyncio.to_thread(move)
        except VersionNotFoundError as exc:
            return JSONResponse(status_code=404, content={"error": str(exc)})
        except RegistryError as exc:
            return JSONResponse(status_code=409, content={"error": str(exc)})
        log.info("event=alias_moved alias=%s %s->%s by=%s", entry.alias, entry.previous, entry.version, entry.actor)
        return JSONResponse(entry.model_dump(mode="json"))

    @api.get("/admin/status")
    async def admin_status(self, request: Request) -> Any:
        if denied := self._unauthorized(request):
            return denied
        runs = await asyncio.to_thread(RunStore(self.settings.home / "runs").list, 10)
        return {
            "champion": await asyncio.to_thread(self._champion),
            "replicas": await self._refresh_replicas(),
            "runs": [r.model_dump(mode="json") for r in runs],
        }

    def __del__(self) -> None:
        self.bus.close()  # flushes what is buffered; the spool/log keeps the rest for the next process

    @api.get("/metrics")
    async def metrics(self) -> Response:
        await self._refresh_replicas()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)
