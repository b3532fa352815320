"""The LLM deployment: one engine per replica, following the registry alias on its own.

Each replica reads the alias on start (so a late replica converges), then watches it; the swap itself
lives in `AdapterManager`. It reports its state to the status board for /healthz and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from ray import serve

from flywheel.bases import served_base
from flywheel.config import Settings
from flywheel.logs import configure_logging
from flywheel.r1 import split_reasoning
from flywheel.registry import Registry
from services.adapters import AdapterManager
from services.engines import build_engine
from services.engines.protocol import ChatMessage, Engine, SamplingOptions
from services.protocol import Completion, Usage
from services.status_board import get_board

log = logging.getLogger("flywheel.llm")

REPORT_INTERVAL_S = 1.0


@serve.deployment(max_ongoing_requests=64, health_check_period_s=5)
class LLMServer:
    async def __init__(self, settings: dict[str, Any], engine: Engine | None = None) -> None:
        configure_logging()
        self.settings = Settings.model_validate(settings)
        self.replica = self._replica_id()
        registry = Registry(
            self.settings.registry_uri, self.settings.model.task, cache_dir=self.settings.home / "cache"
        )
        self.base = await asyncio.to_thread(served_base, self.settings, registry)
        self.engine = engine or build_engine(self.settings, self.base)
        await self.engine.start()
        self.manager = AdapterManager(
            self.engine,
            registry,
            alias=self.settings.serving.alias,
            base_sha256=self.base.source_sha256,  # adapters name the unquantized base they were trained on
            probe_prompt=self.settings.serving.probe_prompt,
            drain_timeout_s=self.settings.serving.drain_timeout_s,
        )
        await self.manager.converge()  # serve the current alias from the first request on
        self._board = get_board(self.settings.registry_uri, self.settings.serving.alias)
        self._tasks = [
            asyncio.create_task(self.manager.watch(self.settings.serving.poll_interval_s)),
            asyncio.create_task(self._report_forever()),
        ]
        log.info("event=replica_ready replica=%s version=%s", self.replica, self.manager.active.version)

    @staticmethod
    def _replica_id() -> str:
        try:
            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit tests)
            return f"local-{uuid.uuid4().hex[:8]}"

    async def generate(
        self, messages: list[ChatMessage], options: SamplingOptions, request_id: str
    ) -> Completion:
        with self.manager.acquire() as slot:
            generation = await self.engine.generate(messages, options, slot.handle, request_id)
        reasoning, answer = split_reasoning(generation.text)
        return Completion(
            adapter_version=slot.version,
            replica=self.replica,
            answer=answer,
            reasoning=reasoning,
            usage=Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
            finish_reason=generation.finish_reason,
        )

    def status(self) -> dict[str, Any]:
        return {**self.manager.status(), "engine": self.settings.serving.engine,
                "base_model": self.base.label, "quantization": self.base.quantization or None}

    async def _report_forever(self) -> None:
        last: dict[str, Any] | None = None
        last_sent = 0.0
        while True:
            status = self.status()
            if status != last or time.monotonic() - last_sent > REPORT_INTERVAL_S:
                with contextlib.suppress(Exception):  # the board is advisory; serving goes on
                    await self._board.report.remote(self.replica, status)
                last, last_sent = status, time.monotonic()
            await asyncio.sleep(0.05)

    async def check_health(self) -> None:
        for task in self._tasks:
            if task.done():
                raise RuntimeError(f"background task stopped: {task.exception()!r}")

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.engine.shutdown()
