"""The LLM deployment: one engine per replica, one LoRA per task, each following its task's alias.

Every task served on the one base keeps its champion resident as its own LoRA (vLLM multi-LoRA) and
has its own `AdapterManager`, so a swap in one task never touches another task's requests. Each
replica reads the aliases on start (so a late replica converges), then watches them, and looks for
tasks added meanwhile (`flywheel train` registers new ones). A request may pin a version of its
task (`version`): that one answers instead of the champion, loaded on demand (`PinnedAdapters`). The
evaluation gate scores a candidate here too (`gate_*`), on the very engine that will serve it. A replica
reports its state to the status board for /healthz and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from flywheel.bases import served_base
from flywheel.config import Settings
from flywheel.logs import configure_logging
from flywheel.r1 import StreamSplitter, split_completion
from flywheel.registry import AliasRecord, UnknownTaskError, known_tasks, registry_for
from flywheel.tasks import TaskSpec
from services.adapters import AdapterManager, AdapterSlot, LoraResidency, PinnedAdapters, VersionTallies
from services.engines import build_engine, lora_capacity
from services.engines.protocol import ChatMessage, Engine, SamplingOptions
from services.engines.served import LLM_DEPLOYMENT
from services.protocol import REFUSED, Completion, Refusal, ReplicaGeneration, StreamEvent, Usage
from services.status_board import get_board

log = logging.getLogger("flywheel.llm")

REPORT_INTERVAL_S = 1.0
DISCOVER_INTERVAL_S = 2.0  # how often a replica looks for tasks registered after it started
REDISCOVER_MIN_S = 0.5  # a request for a task not followed yet looks again at most this often
REFUSABLE = tuple(REFUSED)


def _read_aliases(managers: list[AdapterManager]) -> list[dict[str, AliasRecord] | None]:
    """Every task's aliases in one trip off the event loop (a thread hop per task would cost more than the reads)."""
    return [manager.read_aliases() for manager in managers]


class LLMReplica:
    """One replica's engine and tasks, wherever it runs: in a deployment of its own (`LLMServer`) or inside the
    ingress replica (`services.fused`). `start` does what a constructor would; it awaits the engine."""

    async def start(self, settings: dict[str, Any], engine: Engine | None = None) -> None:
        configure_logging()
        self.settings = Settings.from_shared(settings)
        self.replica = self._replica_id()
        self.base = await asyncio.to_thread(served_base, self.settings, registry_for(self.settings))
        self.specs: dict[str, TaskSpec] = await asyncio.to_thread(known_tasks, self.settings)
        self.engine = engine or build_engine(self.settings, self.base, tasks=len(self.specs))
        await self.engine.start()
        self.loras = LoraResidency(self.engine, capacity=lora_capacity(self.settings, len(self.specs)))

        async def answer_task(task: str) -> str:
            return task

        # Serve's model multiplexing as a routing hint: the gateway names each request's task, and Serve sends
        # it to a replica that answered that task lately, whose LoRA is likely still in `self.loras`.
        self._route_hint = serve.multiplexed(max_num_models_per_replica=self.loras.capacity)(answer_task)
        self.managers: dict[str, AdapterManager] = {}
        self._discovering = asyncio.Lock()  # one discovery at a time: a task is served once it has converged
        self._last_discovery = 0.0
        self.ongoing = 0  # requests in this replica now: its queue depth, for /metrics
        self.gate_requests = 0  # scoring requests of evaluation gates, ever
        # users' requests per version: a canary's guardrails, over its trial, its LoRA's first requests untimed
        self.tallies = VersionTallies(warmup=self.settings.canary.warmup_requests)
        self.pinned = PinnedAdapters(self.engine, base_sha256=self.base.source_sha256,
                                     capacity=self.settings.serving.max_pinned_adapters,
                                     in_use_elsewhere=self._a_champion_holds, loras=self.loras)
        await self._discover()  # every task's current champion from the first request on
        self._board = get_board(self.settings.registry_uri, self.settings.serving.alias)
        self._tasks = [
            asyncio.create_task(self._watch_forever()),
            asyncio.create_task(self._report_forever()),
        ]
        log.info("event=replica_ready replica=%s %s", self.replica,
                 " ".join(f"{t}={m.active.version}" for t, m in self.managers.items()))

    async def _discover(self) -> None:
        """Start following tasks that appeared in config or the registry, converging each at once."""
        async with self._discovering:
            try:
                self.specs = await asyncio.to_thread(known_tasks, self.settings)
                new = {
                    name: AdapterManager(
                        self.engine,
                        registry_for(self.settings, name),
                        alias=self.settings.serving.alias,
                        base_sha256=self.base.source_sha256,  # adapters name the unquantized base they were trained on
                        probe_prompt=self.settings.serving.probe_prompt,
                        drain_timeout_s=self.settings.serving.drain_timeout_s,
                        loras=self.loras,
                        on_trial=self.tallies.restart,
                    )
                    for name in self.specs if name not in self.managers
                }
                await asyncio.gather(*(manager.converge() for manager in new.values()))
                self.managers.update(new)  # a task is served once its champion is loaded, never before
            finally:  # failed or not: the next look waits its turn
                self._last_discovery = time.monotonic()

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.serving.poll_interval_s)
            if time.monotonic() - self._last_discovery > DISCOVER_INTERVAL_S:
                with contextlib.suppress(OSError, ValueError):  # a registry hiccup: try again next round
                    await self._discover()
            managers = list(self.managers.values())
            read = await asyncio.to_thread(_read_aliases, managers)
            await asyncio.gather(*(m.converge(aliases) for m, aliases in zip(managers, read, strict=True)
                                   if aliases is not None))

    def _a_champion_holds(self, version: str) -> bool:
        """Whether a task's champion (or its canary: a share of users needs it at every moment) uses `version`."""
        return any(m.active.version == version or version in m.slots or (m.canary and m.canary.version == version)
                   for m in self.managers.values())

    @contextlib.asynccontextmanager
    async def _slot(self, manager: AdapterManager, version: str | None, *, user: str | None = None,
                    for_gate: bool = False) -> AsyncIterator[AdapterSlot]:
        """The slot a request runs on, held until it is done: the `version` it names, else the task's canary
        for users in the canary's share, else the champion. A canary that cannot be loaded here leaves its
        users on the champion; a named version that cannot be is the caller's 404."""
        canary = None if version else manager.arm(user)
        version = version or canary
        self.ongoing += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                slot = None
                if version is not None and version != manager.active.version:
                    try:
                        slot = await stack.enter_async_context(
                            self.pinned.acquire(manager.registry, version, for_gate=for_gate))
                    except REFUSABLE as exc:
                        if canary is None:
                            raise
                        log.warning("event=canary_unavailable version=%s error=%r", canary, exc)
                slot = slot or stack.enter_context(manager.acquire())
                if slot.handle is not None:  # loaded again if it was evicted to make room for other tasks
                    await stack.enter_async_context(self.loras.using(slot.handle))
                yield slot
        finally:
            self.ongoing -= 1

    async def _mark_task_served(self, task: str | None) -> None:
        """Tell Serve's routers this replica answers `task` (a split gateway's handle, a fused replicas' TaskRouter
        send its requests here next). The task the request asks for, not a header a client may have set."""
        if (task or self.settings.default_task) in self.specs:
            await self._route_hint(task or self.settings.default_task)

    @staticmethod
    def _replica_id() -> str:
        try:
            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit tests)
            return f"local-{uuid.uuid4().hex[:8]}"

    async def _task(self, task: str | None) -> tuple[str, AdapterManager, TaskSpec]:
        """The task's manager and spec. One registered since this replica last looked (the gateway may know it
        first) is followed now rather than at the next discovery round."""
        task = task or self.settings.default_task
        if task not in self.managers and time.monotonic() - self._last_discovery > REDISCOVER_MIN_S:
            with contextlib.suppress(OSError, ValueError):  # a registry hiccup: the caller's retry is answered
                await self._discover()
        manager, spec = self.managers.get(task), self.specs.get(task)
        if manager is None or spec is None:
            raise UnknownTaskError(f"unknown task {task!r}; known tasks: {', '.join(sorted(self.managers))}")
        return task, manager, spec

    def _refuse(self, exc: Exception, request_id: str) -> Refusal:
        refusal = Refusal.of(exc)
        log.info("event=refused request_id=%s kind=%s message=%r", request_id, refusal.kind, refusal.message)
        return refusal

    async def generate(
        self, messages: list[ChatMessage], options: SamplingOptions, request_id: str, task: str | None = None,
        version: str | None = None, user: str | None = None,
    ) -> Completion | Refusal:
        """The whole answer, or why the request cannot be run (the caller's 4xx, one log line).

        Without a `version`, the task's champion answers, or its canary for users in the canary's share."""
        try:
            await self._mark_task_served(task)
            return await self._generate(messages, options, request_id, task, version, user)
        except REFUSABLE as exc:
            return self._refuse(exc, request_id)

    async def _generate(
        self, messages: list[ChatMessage], options: SamplingOptions, request_id: str, task: str | None,
        version: str | None, user: str | None,
    ) -> Completion:
        task, manager, spec = await self._task(task)
        chat = [ChatMessage(**m) for m in spec.conversation([m.model_dump() for m in messages])]
        async with self._slot(manager, version, user=user) as slot, self.tallies.timed(slot.version):
            generation = await self.engine.generate(chat, options, slot.handle, request_id)
        reasoning, answer, truncated = split_completion(generation.text, opened_think=generation.opened_think)
        return Completion(
            task=task,
            adapter_version=slot.version,
            replica=self.replica,
            answer=answer,
            reasoning=reasoning,
            truncated=truncated,
            usage=Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
            finish_reason=generation.finish_reason,
        )

    async def generate_stream(
        self, messages: list[ChatMessage], options: SamplingOptions, request_id: str, task: str | None = None,
        version: str | None = None, user: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """The answer as the engine makes it: reasoning and answer deltas, then the totals.

        The whole stream runs on the version it started with (a swap meanwhile waits for it to drain).
        The first event comes with the first tokens, or is the refusal of a request that cannot be run.
        """
        try:
            await self._mark_task_served(task)
            async for event in self._stream(messages, options, request_id, task, version, user):
                yield event
        except REFUSABLE as exc:
            yield StreamEvent(refusal=self._refuse(exc, request_id), done=True)

    async def _stream(
        self, messages: list[ChatMessage], options: SamplingOptions, request_id: str, task: str | None,
        version: str | None, user: str | None,
    ) -> AsyncIterator[StreamEvent]:
        task, manager, spec = await self._task(task)
        chat = [ChatMessage(**m) for m in spec.conversation([m.model_dump() for m in messages])]
        async with self._slot(manager, version, user=user) as slot, self.tallies.timed(slot.version):
            splitter: StreamSplitter | None = None
            last = None
            async for piece in self.engine.stream(chat, options, slot.handle, request_id):
                splitter = splitter or StreamSplitter(opened_think=piece.opened_think)
                reasoning, answer = splitter.feed(piece.text)
                last = piece
                yield StreamEvent(task=task, adapter_version=slot.version, replica=self.replica,
                                  reasoning=reasoning, answer=answer)
            reasoning, answer, truncated = splitter.finish() if splitter else ("", "", False)
            yield StreamEvent(
                task=task, adapter_version=slot.version, replica=self.replica, reasoning=reasoning, answer=answer,
                done=True, truncated=truncated, finish_reason=last.finish_reason if last else None,
                usage=Usage(prompt_tokens=last.prompt_tokens if last else 0,
                            completion_tokens=last.completion_tokens if last else 0),
            )

    # -- the evaluation gate's requests: this replica's engine, on a task's version (even one evaluating) --

    async def gate_preload(self, task: str, version: str) -> Refusal | None:
        """Load `version` of `task` here before the gate times anything on it."""
        try:
            _, manager, _ = await self._task(task)
            async with self._slot(manager, version, for_gate=True):
                return None
        except REFUSABLE as exc:
            return self._refuse(exc, f"gate-preload-{version}")

    async def gate_generate(
        self, chat: list[ChatMessage], options: SamplingOptions, request_id: str, task: str, version: str,
    ) -> ReplicaGeneration | Refusal:
        """The engine's own generation for `chat` (already in the task's shape), as the gate scores it."""
        self.gate_requests += 1
        try:
            _, manager, _ = await self._task(task)
            async with self._slot(manager, version, for_gate=True) as slot:
                generation = await self.engine.generate(chat, options, slot.handle, request_id)
            return ReplicaGeneration(**generation.model_dump(), replica=self.replica)
        except REFUSABLE as exc:
            return self._refuse(exc, request_id)

    async def gate_logprob(
        self, chat: list[ChatMessage], completion: str, task: str, version: str
    ) -> tuple[float, int] | Refusal:
        """(sum of log-probabilities, tokens) of `completion` as `version`'s answer to `chat`."""
        self.gate_requests += 1
        try:
            _, manager, _ = await self._task(task)
            async with self._slot(manager, version, for_gate=True) as slot:
                return await self.engine.completion_logprob(chat, completion, slot.handle)
        except REFUSABLE as exc:
            return self._refuse(exc, f"gate-logprob-{version}")

    def status(self) -> dict[str, Any]:
        tasks = {name: manager.status() for name, manager in self.managers.items()}
        default = tasks.get(self.settings.default_task) or {"active": "base", "last_failure": None}
        return {"active": default["active"], "last_failure": default["last_failure"], "tasks": tasks,
                "pinned": self.pinned.status(), "loras": self.loras.status(), "ongoing": self.ongoing,
                "gate_requests": self.gate_requests, "versions": self.tallies.status(),
                "engine": self.settings.serving.engine,
                "base_model": self.base.label, "quantization": self.base.quantization or None}

    async def _report_forever(self) -> None:
        last: dict[str, Any] | None = None
        last_sent = 0.0
        while True:
            status = self.status()
            counters = {"ongoing": None, "gate_requests": None, "versions": None}  # always changing: once a second
            changed = {**status, **counters} != {**(last or {}), **counters}
            if changed or time.monotonic() - last_sent > REPORT_INTERVAL_S:
                with contextlib.suppress(Exception):  # the board is advisory; serving goes on
                    await self._board.report.remote(self.replica, status)
                last, last_sent = status, time.monotonic()
            await asyncio.sleep(0.05)

    async def check_health(self) -> None:
        for task in self._tasks:
            if task.done():
                raise RuntimeError(f"background task stopped: {task.exception()!r}")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.engine.shutdown()


@serve.deployment(name=LLM_DEPLOYMENT, max_ongoing_requests=64, health_check_period_s=5)
class LLMServer(LLMReplica):
    """The LLM server in replicas of its own, behind the gateway (`serving.topology: split`)."""

    async def __init__(self, settings: dict[str, Any], engine: Engine | None = None) -> None:
        await self.start(settings, engine)

    async def __del__(self) -> None:
        await self.close()
