"""The replica's adapter state machine, driven with a fake engine (the real one is in test_serving)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from pathlib import Path

import pytest

from flywheel.registry import BaseModelRef, Registry, lora_int_id
from services.adapters import AdapterManager, AdapterState
from services.engines.protocol import AdapterHandle, ChatMessage, Generation, SamplingOptions
from services.metrics import GatewayMetrics
from tests.test_registry import fake_adapter

BASE = BaseModelRef(id="demo", sha256="a" * 64)


class FakeEngine:
    """Answers with the adapter's name; can be told to fail loading or probing one version."""

    base_model = "fake"

    def __init__(self) -> None:
        self.resident: set[str] = set()
        self.fail_load: set[str] = set()
        self.fail_probe: set[str] = set()
        self.release = asyncio.Event()
        self.release.set()
        self.slow_load: dict[str, asyncio.Event] = {}  # adapters whose load waits for their event
        self.slow_load_started = asyncio.Event()

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        if adapter.name in self.fail_load:
            raise RuntimeError("cannot load")
        if (may_finish := self.slow_load.get(adapter.name)) is not None:
            self.slow_load_started.set()
            await may_finish.wait()
        self.resident.add(adapter.name)

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        self.resident.discard(adapter.name)

    async def generate(
        self, messages: list[ChatMessage], options: SamplingOptions, adapter: AdapterHandle | None,
        request_id: str,
    ) -> Generation:
        name = adapter.name if adapter else "base"
        assert adapter is None or name in self.resident, f"{name} used after unload"
        if request_id.startswith("probe") and name in self.fail_probe:
            return Generation(text="", prompt_tokens=1, completion_tokens=0)
        if not request_id.startswith("probe"):
            await self.release.wait()
        return Generation(text=name, prompt_tokens=1, completion_tokens=1)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Registry, FakeEngine, AdapterManager]:
    registry = Registry(str(tmp_path / "registry"), "demo")
    for i in range(3):
        registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE)
    registry.promote("demo-v1", actor="test")
    engine = FakeEngine()
    manager = AdapterManager(engine, registry, alias="champion", base_sha256=BASE.sha256,
                             probe_prompt="ping", drain_timeout_s=5)
    return registry, engine, manager


async def ask(manager: AdapterManager, engine: FakeEngine, request_id: str = "r") -> str:
    with manager.acquire() as slot:
        out = await engine.generate([], SamplingOptions(max_tokens=1), slot.handle, request_id)
    return out.text


async def test_converges_on_start_then_follows_the_alias(setup) -> None:
    registry, engine, manager = setup
    await manager.converge()
    assert manager.active.version == "demo-v1"
    registry.promote("demo-v2", actor="test")
    await manager.converge()
    assert manager.active.version == "demo-v2"
    assert await ask(manager, engine) == "demo-v2"
    await asyncio.sleep(0.2)  # drain runs in the background
    assert engine.resident == {"demo-v2"}
    assert manager.counters.succeeded == 2


async def test_running_requests_finish_on_their_version(setup) -> None:
    registry, engine, manager = setup
    await manager.converge()
    engine.release.clear()
    in_flight = asyncio.create_task(ask(manager, engine))
    await asyncio.sleep(0.05)
    registry.promote("demo-v2", actor="test")
    await manager.converge()
    assert manager.active.version == "demo-v2"
    assert "demo-v1" in engine.resident  # still draining: its request is running
    assert manager.status()["adapters"]["demo-v1"]["state"] == AdapterState.DRAINING
    engine.release.set()
    assert await in_flight == "demo-v1"
    await asyncio.sleep(0.2)
    assert engine.resident == {"demo-v2"}


@pytest.mark.parametrize("failure", ["load", "probe", "hash"])
async def test_a_failed_swap_keeps_the_old_version(setup, failure: str) -> None:
    registry, engine, manager = setup
    await manager.converge()
    if failure == "load":
        engine.fail_load.add("demo-v2")
    elif failure == "probe":
        engine.fail_probe.add("demo-v2")
    registry.promote("demo-v2", actor="test")
    if failure == "hash":
        (registry.local_path("demo-v2") / "adapter_model.safetensors").write_bytes(b"tampered")
    await manager.converge()
    assert manager.active.version == "demo-v1"
    assert await ask(manager, engine) == "demo-v1"
    status = manager.status()
    assert status["swaps_failed"] == 1 and status["last_failure"]["version"] == "demo-v2"
    assert "demo-v2" not in engine.resident
    await manager.converge()  # not retried at once while the alias stays on the failed version
    assert manager.counters.failed == 1
    manager._retry_at = 0.0  # the backoff is over: tried again, and fails again
    await manager.converge()
    assert manager.counters.failed == 2 and manager.active.version == "demo-v1"
    registry.promote("demo-v3", actor="test")
    await manager.converge()
    assert manager.active.version == "demo-v3" and manager.last_failure is None


async def test_a_failed_load_is_retried_with_backoff_and_recovers(setup) -> None:
    """A load that failed for a passing reason (a cache race, a flaky store) is not failed forever."""
    from services.adapters import RETRY_FIRST_S

    registry, engine, manager = setup
    await manager.converge()
    engine.fail_load.add("demo-v2")
    registry.promote("demo-v2", actor="test")
    delays = []
    for _ in range(3):
        await manager.converge()
        delays.append(manager._retry_at - time.monotonic())
        manager._retry_at = 0.0  # skip the wait
    assert [round(d) for d in delays] == [RETRY_FIRST_S, 2 * RETRY_FIRST_S, 4 * RETRY_FIRST_S]
    assert manager.counters.failed == 3
    engine.fail_load.clear()  # the store came back
    await manager.converge()
    assert manager.active.version == "demo-v2" and manager.last_failure is None


async def test_rollback_to_a_draining_version_keeps_it_loaded(setup) -> None:
    registry, engine, manager = setup
    await manager.converge()
    engine.release.clear()
    in_flight = asyncio.create_task(ask(manager, engine))
    await asyncio.sleep(0.05)
    registry.promote("demo-v2", actor="test")
    await manager.converge()
    registry.rollback(actor="test")
    await manager.converge()
    engine.release.set()
    await in_flight
    await asyncio.sleep(0.2)
    assert manager.active.version == "demo-v1"
    assert await ask(manager, engine) == "demo-v1"
    assert engine.resident == {"demo-v1"}


def test_the_status_board_forgets_replicas_that_went_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scaled-down or crashed replicas drop out of /healthz, then out of the board's memory."""
    from services import status_board

    clock = [1000.0]
    monkeypatch.setattr(status_board.time, "time", lambda: clock[0])
    board = status_board.ReplicaBoard.__ray_actor_class__()
    board.report("a", {"active": "demo-v1"})
    board.report("b", {"active": "demo-v1"})
    clock[0] += status_board.STALE_AFTER_S + 1
    board.report("a", {"active": "demo-v2"})
    assert [s["replica"] for s in board.snapshot()] == ["a"]  # b is quiet: not in /healthz
    clock[0] += status_board.FORGET_AFTER_S + 1
    board.report("c", {"active": "demo-v2"})
    assert set(board._replicas) == {"c"}  # a and b went quiet long ago: forgotten, the board stays small


async def test_pinned_versions_load_on_demand_and_the_least_recently_used_idle_one_goes(setup) -> None:
    from services.adapters import PinnedAdapters

    registry, engine, manager = setup
    await manager.converge()  # demo-v1 is the champion
    registry.register(fake_adapter(registry_path(registry) / "extra", b"four"), base=BASE)  # demo-v4
    pinned = PinnedAdapters(engine, base_sha256=BASE.sha256, capacity=2,
                            in_use_elsewhere=lambda v: v == manager.active.version)
    async with pinned.acquire(registry, "demo-v2") as slot:
        assert slot.version == "demo-v2" and "demo-v2" in engine.resident
    async with pinned.acquire(registry, "demo-v3"):
        pass
    async with pinned.acquire(registry, "demo-v2"):  # a hit: demo-v3 is now the least recently used
        pass
    engine.release.clear()
    busy = asyncio.create_task(ask_pinned(pinned, registry, engine, "demo-v2"))
    await asyncio.sleep(0.05)
    async with pinned.acquire(registry, "demo-v4"):  # over capacity: the idle demo-v3 goes, busy demo-v2 stays
        assert set(pinned.slots) == {"demo-v2", "demo-v4"} and "demo-v3" not in engine.resident
    engine.release.set()
    assert await busy == "demo-v2"
    async with pinned.acquire(registry, "demo-v1"):  # the champion's own LoRA is never removed by the cache
        pass
    async with pinned.acquire(registry, "demo-v3"):
        pass
    assert "demo-v1" in engine.resident
    assert (pinned.counters.loads, pinned.counters.evictions) == (5, 3)
    status = pinned.status()
    assert status["loads"] == 5 and len(status["resident"]) == 2
    from flywheel.registry import VersionNotFoundError

    with pytest.raises(VersionNotFoundError):
        async with pinned.acquire(registry, "demo-v9"):
            pass


async def test_a_candidate_being_evaluated_answers_only_the_gate(setup) -> None:
    from flywheel.registry import VersionNotFoundError
    from services.adapters import PinnedAdapters

    registry, engine, _ = setup
    candidate = registry.register(fake_adapter(registry_path(registry) / "candidate", b"new"), base=BASE,
                                  status="evaluating").version
    pinned = PinnedAdapters(engine, base_sha256=BASE.sha256, capacity=2)
    with pytest.raises(VersionNotFoundError, match="being evaluated"):
        async with pinned.acquire(registry, candidate):
            pass
    async with pinned.acquire(registry, candidate, for_gate=True) as slot:
        assert slot.version == candidate
    with pytest.raises(VersionNotFoundError, match="being evaluated"):  # loaded now, and still private
        async with pinned.acquire(registry, candidate):
            pass
    registry.conclude(candidate, "ready")
    assert await ask_pinned(pinned, registry, engine, candidate) == candidate


def registry_path(registry: Registry) -> Path:
    return Path(registry.root).parent


async def ask_pinned(pinned, registry: Registry, engine: FakeEngine, version: str) -> str:
    async with pinned.acquire(registry, version) as slot:
        out = await engine.generate([], SamplingOptions(max_tokens=1), slot.handle, "r")
    return out.text


async def test_lora_residency_loads_on_demand_and_evicts_the_least_recently_used_idle_one() -> None:
    from services.adapters import LoraResidency

    engine = FakeEngine()
    loras = LoraResidency(engine, capacity=2)
    a, b, c, d = (AdapterHandle(name=f"t{i}-v1", int_id=i, path=Path("/nowhere")) for i in range(1, 5))

    async def run_on(handle: AdapterHandle) -> str:
        async with loras.using(handle):
            return (await engine.generate([], SamplingOptions(max_tokens=1), handle, "r")).text

    assert [await run_on(h) for h in (a, b, a)] == ["t1-v1", "t2-v1", "t1-v1"]
    assert engine.resident == {"t1-v1", "t2-v1"}
    assert await run_on(c) == "t3-v1"  # full: b, the least recently used, makes room
    assert engine.resident == {"t1-v1", "t3-v1"}

    engine.release.clear()
    busy = asyncio.create_task(run_on(a))  # a request runs on a …
    await asyncio.sleep(0.05)
    async with loras.using(c):  # … and c is used after it: a is the least recently used
        pass
    async with loras.using(d):  # full: c makes room, never a while it answers
        assert engine.resident == {"t1-v1", "t4-v1"}
    engine.release.set()
    assert await busy == "t1-v1"
    assert await run_on(b) == "t2-v1"  # evicted earlier: loaded again, and counted again

    status = loras.status()
    assert status["loads"] == {"t1-v1": 1, "t2-v1": 2, "t3-v1": 1, "t4-v1": 1}
    assert status["evictions"] == {"t2-v1": 1, "t3-v1": 1, "t1-v1": 1}
    assert len(status["resident"]) == 2 and set(status["load_seconds"]) == set(status["loads"])

    engine.release.clear()
    busy = asyncio.create_task(run_on(b))
    await asyncio.sleep(0.05)
    await loras.unload(b)  # retired while a request runs on it: it stays until that request is done
    assert "t2-v1" in engine.resident
    engine.release.set()
    assert await busy == "t2-v1"
    await loras.unload(b)
    assert "t2-v1" not in engine.resident


def lora_handles(count: int) -> list[AdapterHandle]:
    return [AdapterHandle(name=f"t{i}-v1", int_id=i, path=Path("/nowhere")) for i in range(1, count + 1)]


async def run_on_lora(loras, engine: FakeEngine, handle: AdapterHandle) -> str:
    async with loras.using(handle):
        return (await engine.generate([], SamplingOptions(max_tokens=1), handle, "r")).text


async def test_a_slow_lora_load_never_holds_up_requests_for_other_loras() -> None:
    """The engine's load of one LoRA can take seconds: a request for another must not wait on it."""
    from services.adapters import LoraResidency

    engine, (a, b) = FakeEngine(), lora_handles(2)
    loras = LoraResidency(engine, capacity=4)
    engine.slow_load["t1-v1"] = slow_may_finish = asyncio.Event()
    slow = [asyncio.create_task(run_on_lora(loras, engine, a)) for _ in range(3)]
    await engine.slow_load_started.wait()
    try:  # (the timeout only keeps a regression from hanging: the order is what is asserted)
        assert await asyncio.wait_for(run_on_lora(loras, engine, b), timeout=5) == "t2-v1"
        assert not any(task.done() for task in slow) and "t1-v1" not in engine.resident
    finally:
        slow_may_finish.set()
    assert await asyncio.gather(*slow) == ["t1-v1"] * 3
    assert loras.status()["loads"] == {"t1-v1": 1, "t2-v1": 1}  # three requests for t1 waited on one load


async def test_lora_residency_never_takes_a_place_twice_and_removes_no_lora_in_use() -> None:
    """Every place busy: the new LoRA goes past capacity rather than refuse (a swap, or a task's request), and a
    LoRA answering is never removed; once idle, the next load evicts back down. A LoRA being loaded holds its
    place: two loads never both count it free."""
    from services.adapters import LoraResidency

    engine, (a, b, c) = FakeEngine(), lora_handles(3)
    loras = LoraResidency(engine, capacity=2)
    engine.release.clear()
    busy = [asyncio.create_task(run_on_lora(loras, engine, handle)) for handle in (a, b)]
    while sum(entry.users for entry in loras.resident.values()) < 2:  # both requests run on their LoRA
        await asyncio.sleep(0)
    await loras.load(c)
    assert engine.resident == {"t1-v1", "t2-v1", "t3-v1"} and loras.status()["evictions"] == {}
    engine.release.set()
    assert await asyncio.gather(*busy) == ["t1-v1", "t2-v1"]
    await loras.load(a)  # resident already: nothing moves
    d = lora_handles(4)[3]
    assert await run_on_lora(loras, engine, d) == "t4-v1"  # idle now: back down to capacity
    assert len(engine.resident) == 2 and sum(loras.status()["evictions"].values()) == 2

    engine = FakeEngine()
    loras = LoraResidency(engine, capacity=1)
    engine.slow_load["t1-v1"] = slow_may_finish = asyncio.Event()
    loading = asyncio.create_task(loras.load(a))
    await engine.slow_load_started.wait()
    other = asyncio.create_task(loras.load(b))  # a's place is taken while it loads: b goes past, evicting nothing
    await asyncio.wait_for(other, timeout=5)
    assert engine.resident == {"t2-v1"} and loras.status()["evictions"] == {}
    slow_may_finish.set()
    await loading
    assert engine.resident == {"t1-v1", "t2-v1"}


async def test_versions_whose_names_hash_alike_get_distinct_lora_ids_and_their_own_weights() -> None:
    """demo-v29595 and demo-v56814 share the 31-bit sha256 prefix the ids once were: one engine holding both
    answered for one with the other's weights."""
    from services.adapters import LoraResidency

    colliding = ("demo-v29595", "demo-v56814")
    old_ids = {int.from_bytes(hashlib.sha256(v.encode()).digest()[:4], "big") % (2**31 - 2) + 1 for v in colliding}
    assert len(old_ids) == 1
    assert lora_int_id(colliding[0]) != lora_int_id(colliding[1])
    assert lora_int_id(colliding[0]) == lora_int_id(colliding[0])  # stable: the same name, the same id

    engine = FakeEngine()
    loras = LoraResidency(engine, capacity=4)
    answers = []
    for version in colliding:
        handle = AdapterHandle(name=version, int_id=lora_int_id(version), path=Path("/nowhere"))
        async with loras.using(handle):
            answers.append((await engine.generate([], SamplingOptions(max_tokens=1), handle, "r")).text)
    assert answers == list(colliding) and engine.resident == set(colliding)


async def test_a_slow_pinned_load_never_holds_up_requests_for_other_versions(
        setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verifying a version hashes all its weights: a request for another version must not wait on that."""
    from services.adapters import PinnedAdapters

    registry, engine, _ = setup
    verify, slow_verify_may_finish = registry.verify, threading.Event()

    def verify_demo_v2_slowly(version: str, **kwargs: object) -> object:
        if version == "demo-v2":
            slow_verify_may_finish.wait(timeout=10)
        return verify(version, **kwargs)

    monkeypatch.setattr(registry, "verify", verify_demo_v2_slowly)
    pinned = PinnedAdapters(engine, base_sha256=BASE.sha256, capacity=2)
    slow = [asyncio.create_task(ask_pinned(pinned, registry, engine, "demo-v2")) for _ in range(3)]
    await asyncio.sleep(0.05)
    try:
        assert await asyncio.wait_for(ask_pinned(pinned, registry, engine, "demo-v3"), timeout=5) == "demo-v3"
        assert not any(task.done() for task in slow)
    finally:
        slow_verify_may_finish.set()
    assert await asyncio.gather(*slow) == ["demo-v2"] * 3
    assert pinned.counters.loads == 2  # three requests for demo-v2 waited on one load


async def test_pinned_versions_never_exceed_capacity_when_every_one_is_busy(setup) -> None:
    from services.adapters import PinnedAdapters, PinnedAdaptersBusyError

    registry, engine, _ = setup
    pinned = PinnedAdapters(engine, base_sha256=BASE.sha256, capacity=1)
    engine.release.clear()
    busy = asyncio.create_task(ask_pinned(pinned, registry, engine, "demo-v2"))
    await asyncio.sleep(0.05)
    with pytest.raises(PinnedAdaptersBusyError):
        async with pinned.acquire(registry, "demo-v3"):
            pass
    assert set(pinned.slots) == {"demo-v2"} and "demo-v3" not in engine.resident
    engine.release.set()
    assert await busy == "demo-v2"
    assert await ask_pinned(pinned, registry, engine, "demo-v3") == "demo-v3"  # idle now: demo-v2 makes room
    assert set(pinned.slots) == {"demo-v3"} and "demo-v2" not in engine.resident


def test_a_full_residency_travels_as_a_refusal_and_reaches_the_client_as_503_with_retry_after() -> None:
    from services.adapters import BUSY_RETRY_AFTER_S, AdaptersBusyError, PinnedAdaptersBusyError
    from services.openai_api import ChatCompletions
    from services.protocol import Refusal

    chat = ChatCompletions(llm=None, settings=None, tasks=None, publish=None, metrics=GatewayMetrics())  # type: ignore[arg-type]
    for busy in (PinnedAdaptersBusyError("all 2 pinned versions are answering requests"),
                 AdaptersBusyError("all 6 loaded adapters are answering requests")):
        refusal = Refusal.of(busy)
        assert type(refusal.error()) is type(busy)
        response = chat._engine_refusal(refusal.error(), "demo@demo-v2")
        assert response.status_code == 503 and response.headers["retry-after"] == str(BUSY_RETRY_AFTER_S)


class FakeTime:
    """`time` for services.adapters, whose perf_counter the test moves by hand: latencies exact, not the box's."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


async def test_the_guardrails_judge_the_trial_without_the_new_loras_first_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before its trial, demo-v2 was slow and failing (another load, another time); on trial its first requests
    load its LoRA. Neither counts: at the configured p99 ratio the trial passes its guardrails, and a canary
    slow within the trial is still caught."""
    from flywheel.canary import review
    from flywheel.config import CanarySettings
    from services import adapters
    from services.adapters import VersionTallies
    from services.status_board import version_figures

    clock = FakeTime()
    monkeypatch.setattr(adapters, "time", clock)
    registry = Registry(str(tmp_path / "registry"), "demo")
    for i in range(2):
        registry.register(fake_adapter(tmp_path / f"a{i}", bytes([i])), base=BASE)
    registry.promote("demo-v1", actor="test")
    cfg = CanarySettings()
    tallies = VersionTallies(warmup=cfg.warmup_requests)
    manager = AdapterManager(FakeEngine(), registry, alias="champion", base_sha256=BASE.sha256,
                             probe_prompt="ping", drain_timeout_s=5, on_trial=tallies.restart)
    await manager.converge()

    async def serve(version: str, ms: float, n: int, fail: bool = False) -> None:
        for _ in range(n):
            with contextlib.suppress(RuntimeError):
                async with tallies.timed(version):
                    clock.now += ms / 1000
                    if fail:
                        raise RuntimeError("engine error")

    await serve("demo-v1", 100, 40)
    await serve("demo-v2", 800, 40)  # its lifetime before the trial
    await serve("demo-v2", 50, 10, fail=True)
    registry.promote("demo-v2", alias="canary", traffic_fraction=0.05, actor="test")
    await manager.converge()
    assert manager.canary is not None and manager.canary.version == "demo-v2"
    await serve("demo-v2", 2000, cfg.warmup_requests)  # its LoRA's first use
    await serve("demo-v2", 400, 1)  # one stall among a few timed requests: too few for a p99, nothing judged
    await serve("demo-v1", 100, 30)
    few = version_figures([{"versions": tallies.status()}])
    assert few["demo-v2"]["p99_ms"] == few["demo-v1"]["p99_ms"] == 0.0
    assert review(registry, cfg, lambda _since: [], few).verdict == "hold"  # type: ignore[union-attr]
    await serve("demo-v2", 110, adapters.P99_MIN_SAMPLES)
    await serve("demo-v1", 100, adapters.P99_MIN_SAMPLES)
    figures = version_figures([{"versions": tallies.status()}])
    assert figures["demo-v2"] == {"requests": adapters.P99_MIN_SAMPLES + 1 + cfg.warmup_requests, "failures": 0,
                                  "p99_ms": pytest.approx(110)}
    assert figures["demo-v1"]["p99_ms"] == pytest.approx(100)
    decided = review(registry, cfg, lambda _since: [], figures)
    assert decided is not None and decided.verdict == "hold", decided.reason

    await serve("demo-v2", 400, 30)  # slow within the trial: the guardrail still sees it
    await manager.converge()  # the same trial, looked at again: nothing restarts
    slow = review(registry, cfg, lambda _since: [], version_figures([{"versions": tallies.status()}]))
    assert slow is not None and slow.verdict == "rollback" and "p99" in slow.reason, slow.reason
