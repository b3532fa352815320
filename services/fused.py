"""`serving.topology: fused`: each replica is the HTTP ingress and the LLM server at once.

A request then goes HAProxy (or Serve's proxy) → this replica's FastAPI → its own engine, in one process:
no Serve handle call between a gateway and an LLM replica, which on a small box is most of what flywheel
adds to vLLM's own latency. The routes are the gateway's (`services.gateway`), the engine and its tasks
`LLMReplica`'s. The deployment keeps the LLM deployment's name, so the evaluation gate reaches it the
same way (`gate_*`, through a handle, never through the HTTP routes and the feedback stream).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from services.engines.protocol import ChatMessage, SamplingOptions
from services.engines.served import LLM_DEPLOYMENT
from services.gateway import Gateway
from services.llm_client import LocalLLM
from services.llm_server import LLMReplica
from services.protocol import Refusal, ReplicaGeneration


@serve.deployment(name=LLM_DEPLOYMENT, max_ongoing_requests=512, health_check_period_s=5)
class FusedServer(Gateway.func_or_class):  # the gateway class as `@serve.ingress` made it: its routes come along
    async def __init__(self, settings: dict[str, Any], loop: DeploymentHandle | None = None) -> None:
        self.server = LLMReplica()
        await self.server.start(settings)
        await super().__init__(LocalLLM(self.server), settings, loop)

    async def gate_preload(self, task: str, version: str) -> Refusal | None:
        return await self.server.gate_preload(task, version)

    async def gate_generate(self, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str,
                            version: str) -> ReplicaGeneration | Refusal:
        return await self.server.gate_generate(chat, options, request_id, task, version)

    async def gate_logprob(self, chat: list[ChatMessage], completion: str, task: str, version: str
                           ) -> tuple[float, int] | Refusal:
        return await self.server.gate_logprob(chat, completion, task, version)

    async def check_health(self) -> None:
        await self.server.check_health()

    async def __del__(self) -> None:
        await super().__del__()
        await self.server.close()
