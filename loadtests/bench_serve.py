"""`flywheel bench serve`: the serving plane's ratios, measured in one run on one machine.

1. overhead:   p50 of /predict over HTTP ÷ p50 of the same generation through the engine in-process
2. batching:   requests/s at 16 concurrent ÷ at 1 (continuous batching must survive the stack)
3. hot swap:   failed requests during a swap under load, p99 during the swap ÷ steady p99, and the time
               from the alias move until every replica serves the new version (from the status board)
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
from pydantic import BaseModel

from flywheel.config import Settings
from flywheel.registry import registry_for
from flywheel.stats import percentile
from services.engines import build_engine
from services.engines.protocol import AdapterHandle, ChatMessage, SamplingOptions
from training.demo_bootstrap import bootstrap, train_demo_adapter

PROMPT = "Analyze the sentiment of this news: Acme shares surged after record quarterly profits"
MAX_TOKENS = 32


class ServeBenchReport(BaseModel):
    engine: str
    replicas: int
    in_process_p50_ms: float
    http_p50_ms: float
    http_over_in_process_p50: float
    rps_at_1: float
    rps_at_16: float
    rps_16_over_1: float
    swap_failed_requests: int
    swap_requests: int
    steady_p99_ms: float
    swap_p99_ms: float
    swap_p99_over_steady_p99: float
    alias_to_all_replicas_s: float
    swapped_to: str


async def _in_process_p50(settings: Settings, version: str, samples: int) -> float:
    registry = registry_for(settings)
    engine = build_engine(settings)
    await engine.start()
    handle = AdapterHandle(name=version, int_id=registry.manifest(version).number,
                           path=registry.local_path(version))
    await engine.add_adapter(handle)
    messages = [ChatMessage(role="user", content=PROMPT)]
    options = SamplingOptions(max_tokens=MAX_TOKENS)
    latencies = []
    for i in range(samples + 3):
        started = time.perf_counter()
        await engine.generate(messages, options, handle, f"bench-{i}")
        if i >= 3:  # warm-up excluded
            latencies.append(time.perf_counter() - started)
    await engine.shutdown()
    return statistics.median(latencies) * 1000


async def _load(url: str, concurrency: int, seconds: float) -> list[tuple[float, float, int]]:
    """(start, latency, status) of every request sent by `concurrency` closed-loop clients."""
    results: list[tuple[float, float, int]] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker() -> None:
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    r = await client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                results.append((started, time.monotonic() - started, status))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def _wait_all_replicas(url: str, version: str, since: float, timeout_s: float = 60) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() - since < timeout_s:
            health = (await client.get(f"{url}/healthz")).json()
            if health["serving"] == [version] and health["replicas"]:
                return time.monotonic() - since
            await asyncio.sleep(0.02)
    raise TimeoutError(f"replicas did not all reach {version} in {timeout_s}s")


async def _http_phase(url: str, settings: Settings, target: str, seconds: float,
                      say: Callable[[str], None]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(3):
            await client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS})
        latencies = []
        for _ in range(30):
            started = time.perf_counter()
            r = await client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
    say("measuring throughput at 1 and 16 concurrent clients")
    one = await _load(url, 1, seconds)
    sixteen = await _load(url, 16, seconds)

    say(f"swap under load: 8 clients, promote {target} mid-run")
    registry = registry_for(settings)
    load = asyncio.create_task(_load(url, 8, seconds * 3))
    await asyncio.sleep(seconds * 1.5)
    moved_at = time.monotonic()
    await asyncio.to_thread(registry.promote, target, actor="bench", reason="swap under load")
    converged = await _wait_all_replicas(url, target, moved_at)
    swap_results = await load
    steady = [lat for start, lat, _ in swap_results if start < moved_at]
    during = [lat for start, lat, _ in swap_results if moved_at <= start <= moved_at + converged + 1.0]
    return {
        "http_p50_ms": statistics.median(latencies) * 1000,
        "rps_at_1": sum(1 for _, _, s in one if s == 200) / seconds,
        "rps_at_16": sum(1 for _, _, s in sixteen if s == 200) / seconds,
        "swap_failed_requests": sum(1 for _, _, s in swap_results if s != 200),
        "swap_requests": len(swap_results),
        "steady_p99_ms": (percentile(steady, 0.99) or 0.0) * 1000,
        "swap_p99_ms": (percentile(during, 0.99) or 0.0) * 1000,
        "alias_to_all_replicas_s": converged,
    }


def run_serve_bench(settings: Settings, *, seconds: float = 10.0,
                    say: Callable[[str], None] = print) -> ServeBenchReport:
    from services import app as serve_app

    say("bootstrapping (if needed)")
    bootstrap(settings, progress=say)
    registry = registry_for(settings)
    champion = registry.alias("champion") or ""
    others = [m.version for m in registry.versions() if m.version != champion and m.status == "ready"]
    target = others[-1] if others else train_demo_adapter(settings, registry, distribution="drifted").version

    say("measuring the engine in-process")
    in_process = asyncio.run(_in_process_p50(settings, champion, samples=30))
    say("starting Ray Serve")
    url = serve_app.run(settings)
    try:
        http = asyncio.run(_http_phase(url, settings, target, seconds, say))
    finally:
        registry.promote(champion, actor="bench", reason="restore champion after bench")
        serve_app.shutdown()
    return ServeBenchReport(
        engine=settings.serving.engine,
        replicas=settings.serving.replicas,
        in_process_p50_ms=in_process,
        http_over_in_process_p50=http["http_p50_ms"] / in_process,
        rps_16_over_1=http["rps_at_16"] / max(http["rps_at_1"], 1e-9),
        swap_p99_over_steady_p99=http["swap_p99_ms"] / http["steady_p99_ms"],
        swapped_to=target,
        **http,
    )
