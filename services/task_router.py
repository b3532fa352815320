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

from fastapi import FastAPI, HTTPException, Request
from ray import serve
from ray.serve._private.constants import SERVE_MULTIPLEXED_MODEL_ID
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from flywheel.tasks import TASK_NAME_PATTERN

ROUTE_BODY_BYTES = 1 << 20  # HAProxy forwards at most this much of a body to the router (its buffer size)
TRUNCATED_HEADER = "x-body-truncated"  # set by HAProxy when it forwards only the head of a body
_TASK_NAME = re.compile(TASK_NAME_PATTERN)

router_app = FastAPI()


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


@serve.deployment(name="TaskRouter", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(router_app)
class TaskRouter:
    def __init__(self, replicas: DeploymentHandle, default_task: str) -> None:
        self.replicas = replicas
        self.default_task = default_task

    @router_app.post("/internal/route")
    async def route(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        task = None if TRUNCATED_HEADER in request.headers else task_of(body, self.default_task)
        handle = self.replicas.options(multiplexed_model_id=task) if task else self.replicas
        try:
            # _reserve=False: the request itself goes through HAProxy, not this handle, so no slot is held for it
            async with handle.choose_replica(_reserve=False) as selection:
                replica = selection._replica  # the replica's HTTP endpoint: not in the public fields in Ray 2.60
                endpoint = replica.backend_http_endpoint
        except DeploymentUnavailableError as exc:
            raise HTTPException(503, "no LLM replica is available") from exc
        if endpoint is None:
            raise HTTPException(503, f"replica {selection.replica_id} has no HTTP endpoint yet")
        host, port = endpoint
        answer: dict[str, Any] = {"host": host, "port": port, "replica_id": replica.replica_id.to_full_id_str()}
        if task:
            answer["request_headers"] = {SERVE_MULTIPLEXED_MODEL_ID: task}
        return answer
