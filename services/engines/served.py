"""The serving replicas seen as an engine: how the gate judges a candidate on exactly the engine that serves.

Each call goes through the app's LLM deployment (a Serve handle), so it runs on a serving replica next to
users' requests: on a version of one task, the candidate loaded there privately while it is `evaluating`.
The gateway is not on this path, so a scoring request never reaches the feedback stream or users' metrics;
the caller bounds how many it keeps in flight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.engines.protocol import AdapterHandle, ChatMessage, EngineError, Generation, SamplingOptions
from services.protocol import Refusal, ReplicaGeneration

LLM_DEPLOYMENT = "LLMServer"


class ServedEngine:
    def __init__(self, handle: Any, *, app_name: str, task: str, base_model: str) -> None:
        self.handle = handle
        self.app_name = app_name
        self.task = task
        self.base_model = base_model
        self.replicas: set[str] = set()  # which replicas answered: the gate report names them

    @classmethod
    def connect(cls, app_name: str, *, task: str, base_model: str) -> ServedEngine | None:
        """The LLM deployment of Serve app `app_name` on the Ray cluster this process is connected to,
        or None when no such app is running there (a retrain run outside the platform)."""
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            application = serve.status().applications.get(app_name)
        except RayServeException:  # no Serve on this cluster
            return None
        if application is None or application.status not in ("RUNNING", "DEPLOYING"):
            return None
        return cls(serve.get_deployment_handle(LLM_DEPLOYMENT, app_name), app_name=app_name, task=task,
                   base_model=base_model)

    def identity(self) -> dict[str, Any]:
        return {"engine": "serving", "app": self.app_name, "replicas": sorted(self.replicas)}

    async def start(self) -> None:
        """Nothing to start: the replicas are serving already."""

    async def shutdown(self) -> None:
        """Nothing to stop: the replicas go on serving."""

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        """Load the version on a replica before scoring starts, so loading is not timed as latency."""
        self._answer(await self.handle.gate_preload.remote(self.task, adapter.name))

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        """Replicas unload versions nobody uses by themselves (least recently used first)."""

    async def generate(
        self, messages: list[ChatMessage], options: SamplingOptions, adapter: AdapterHandle | None, request_id: str,
    ) -> Generation:
        if adapter is None:
            raise EngineError("the serving replicas score versions of a task, not the bare base")
        answer: ReplicaGeneration = self._answer(
            await self.handle.gate_generate.remote(messages, options, request_id, self.task, adapter.name))
        self.replicas.add(answer.replica)
        return answer

    async def stream(
        self, messages: list[ChatMessage], options: SamplingOptions, adapter: AdapterHandle | None, request_id: str,
    ) -> AsyncIterator[Generation]:
        yield await self.generate(messages, options, adapter, request_id)

    async def completion_logprob(
        self, messages: list[ChatMessage], completion: str, adapter: AdapterHandle | None
    ) -> tuple[float, int]:
        if adapter is None:
            raise EngineError("the serving replicas score versions of a task, not the bare base")
        return self._answer(await self.handle.gate_logprob.remote(messages, completion, self.task, adapter.name))

    @staticmethod
    def _answer(answer: Any) -> Any:
        if isinstance(answer, Refusal):
            raise answer.error()
        return answer
