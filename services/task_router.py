"""Task affinity at the ingress: which LLM replica answers a request, decided before it reaches one.

With several fused replicas (each its own HTTP ingress, `services.fused`) behind Ray Serve's HAProxy, HAProxy
asks this deployment for every POST (`/internal/route`, with the request's body) and then sends the request
straight to the replica named: no gateway hop. The choice is Serve's own request router with the request's
task as the multiplexed model id, so a task's requests go to replicas whose LoRA for it is loaded, as the split
topology's gateway does through its handle. This is Ray Serve's ingress request router ("direct ingress",
the contract Ray Serve LLM's `LLMRouter` uses); HAProxy deletes any multiplexed-model-id header a client sends,
and sets the one answered here.

A body with no task (`/feedback`, a body that is not JSON, one truncated at HAProxy's buffer) is routed on load
alone: the replica it reaches reads the body itself, and answers 4xx where it is wrong.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ray import serve
from ray.serve._private.constants import SERVE_MULTIPLEXED_MODEL_ID
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from flywheel.tasks import TASK_NAME_PATTERN

ROUTE_BODY_BYTES = 1 << 20  # HAProxy forwards at most this much of a body to the router (its buffer size)
TRUNCATED_HEADER = "x-body-truncated"  # set by HAProxy when it forwards only the head of a body
_TASK_NAME = re.compile(TASK_NAME_PATTERN)
# HAProxy waits on this answer before every POST's first byte reaches a replica: Serve runs the router's code and
# its handle's router on the replica's own event loop (no hop between threads)
SAME_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def task_of(body: bytes, default_task: str) -> str | None:
    """The task a request body asks for: `/v1`'s `model` (a task, or `task@version`), `/predict`'s `task`, else the
    default task for a body that names none; None for a body that is not a JSON object or names no valid task."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (bytes that are not UTF-8 included), or nested past Python's stack
        return None
    if not isinstance(request, dict):
        return None
    named = request.get("model", request.get("task", default_task))
    task = named.partition("@")[0] if isinstance(named, str) else None
    return task if task and _TASK_NAME.fullmatch(task) else None


@serve.deployment(name="TaskRouter", max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SAME_LOOP_ENV}})
class TaskRouter:
    """Answers HAProxy's `POST /internal/route` (a plain ASGI callable: no web framework on this hot path)."""

    def __init__(self, replicas: DeploymentHandle, default_task: str) -> None:
        self.replicas = replicas
        self.default_task = default_task

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method != "POST" or not request.url.path.endswith("/internal/route"):
            return JSONResponse({"detail": "HAProxy asks POST /internal/route"}, status_code=404)
        body = await request.body()
        task = None if TRUNCATED_HEADER in request.headers else task_of(body, self.default_task)
        handle = self.replicas.options(multiplexed_model_id=task) if task else self.replicas
        try:
            # _reserve=False: the request itself goes through HAProxy, not this handle, so no slot is held for it
            async with handle.choose_replica(_reserve=False) as selection:
                replica = selection._replica  # the replica's HTTP endpoint: not in the public fields in Ray 2.60
                endpoint = replica.backend_http_endpoint
        except DeploymentUnavailableError:
            return JSONResponse({"detail": "no LLM replica is available"}, status_code=503)
        if endpoint is None:
            return JSONResponse({"detail": f"replica {selection.replica_id} has no HTTP endpoint yet"},
                                status_code=503)
        host, port = endpoint
        answer: dict[str, Any] = {"host": host, "port": port, "replica_id": replica.replica_id.to_full_id_str()}
        if task:
            answer["request_headers"] = {SERVE_MULTIPLEXED_MODEL_ID: task}
        return JSONResponse(answer)
