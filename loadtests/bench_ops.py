"""Benchmarks for ops: what a Prometheus scrape costs, and the LLM replicas autoscaling under a Locust ramp.

`flywheel bench scrape`: /metrics with the default task alone, then with 8 more tasks of 3 versions each, every
version asked for (pinned) and rated, so every per-version series exists: p50 of a scrape, its size and its
series, as a ratio of the one-task scrape.

`flywheel bench autoscale`: the LLM deployment between 1 and `--max-replicas` replicas on Serve's autoscaler;
Locust ramps users up; replicas are sampled every second from /healthz; p99 before the second replica serves
and after, and the failed requests (goal 0).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from flywheel.config import AutoscalingSettings, Settings
from flywheel.registry import registry_for
from flywheel.stats import percentile
from loadtests.bench_openai import PROMPT, add_tasks, scratch_registry
from loadtests.demo import locust_failures, start_locust
from training.demo_bootstrap import bootstrap


class Scrape(BaseModel):
    tasks: int
    versions: int
    p50_ms: float
    bytes: int
    series: int


class ScrapeBenchReport(BaseModel):
    alone: Scrape
    many: Scrape
    p50_ratio: float

    def lines(self) -> list[str]:
        return [f"/metrics with {s.tasks} task(s) x {s.versions} version(s): p50 {s.p50_ms:.1f} ms, "
                f"{s.bytes / 1024:.0f} KiB, {s.series} series" for s in (self.alone, self.many)] + [
                f"scrape p50 ratio {self.p50_ratio:.2f}"]


def _scrape(url: str, tasks: int, versions: int, samples: int) -> Scrape:
    times, body = [], ""
    with httpx.Client(timeout=30) as client:
        for _ in range(samples):
            started = time.perf_counter()
            response = client.get(f"{url}/metrics")
            times.append(time.perf_counter() - started)
            response.raise_for_status()
            body = response.text
    series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    return Scrape(tasks=tasks, versions=versions, p50_ms=statistics.median(times) * 1000, bytes=len(body),
                  series=series)


async def _ask_and_rate(url: str, models: list[str]) -> None:
    """One chat completion per model (a pinned `task@version` or a task), each rated."""
    async with httpx.AsyncClient(timeout=120) as client:
        for model in models:
            answer = await client.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16})
            answer.raise_for_status()
            (await client.post(f"{url}/feedback", json={"request_id": answer.json()["id"], "rating": 4,
                                                        "thumb": "up"})).raise_for_status()


def run_scrape_bench(settings: Settings, *, tasks: int = 8, versions: int = 3, samples: int = 50,
                     say: Callable[[str], None] = print) -> ScrapeBenchReport:
    bootstrap(settings, progress=say)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-scrape-") as scratch:
        settings = scratch_registry(settings, Path(scratch) / "registry")
        return _scrape_bench(settings, tasks, versions, samples, say)


def _scrape_bench(settings: Settings, tasks: int, versions: int, samples: int, say: Callable[[str], None]
                  ) -> ScrapeBenchReport:
    from services import app as serve_app

    registry = registry_for(settings)
    champion = registry.alias("champion")
    settings.serving.max_pinned_adapters = tasks * versions  # every version stays resident between scrapes
    url = serve_app.run(settings, timeout_s=600)
    try:
        asyncio.run(_ask_and_rate(url, [settings.default_task] * 3))
        say("scraping with the default task alone")
        alone = _scrape(url, 1, 1, samples)
        names = add_tasks(settings, [registry.local_path(champion)], tasks, versions)
        time.sleep(5)  # replicas discover new tasks every 2 s
        pinned = [f"{name}@{m.version}" for name in names for m in registry_for(settings, name).versions()]
        say(f"asking and rating {len(pinned)} pinned versions")
        asyncio.run(_ask_and_rate(url, pinned))
        say(f"scraping with {tasks} more tasks x {versions} versions")
        many = _scrape(url, tasks + 1, versions, samples)
    finally:
        serve_app.shutdown()
    return ScrapeBenchReport(alone=alone, many=many, p50_ratio=many.p50_ms / alone.p50_ms)


class ReplicaSample(BaseModel):
    t_s: float
    replicas: int


class AutoscaleBenchReport(BaseModel):
    seconds: float
    users: int
    requests: int
    failed_requests: int = Field(description="Locust's failures and exceptions (goal 0).")
    scaled_up_at_s: float | None = Field(description="When a second replica first reported (None: never).")
    p99_before_ms: float | None
    p99_after_ms: float | None
    max_replicas_seen: int
    replicas: list[ReplicaSample]

    def lines(self) -> list[str]:
        up = "never" if self.scaled_up_at_s is None else f"at {self.scaled_up_at_s:.0f} s"
        ratio = (f" = {self.p99_after_ms / self.p99_before_ms:.2f}"
                 if self.p99_before_ms and self.p99_after_ms else "")
        return [f"{self.requests} requests over {self.seconds:.0f} s, ramp to {self.users} users: "
                f"{self.failed_requests} failed (goal 0)",
                f"replicas 1 -> {self.max_replicas_seen}; second replica serving {up}",
                f"p99 before {self.p99_before_ms or 0:.0f} ms, after {self.p99_after_ms or 0:.0f} ms{ratio}"]


def run_autoscale_bench(settings: Settings, out_dir: Path, *, users: int = 24, seconds: float = 240.0,
                        max_replicas: int = 2, say: Callable[[str], None] = print) -> AutoscaleBenchReport:
    from services import app as serve_app

    bootstrap(settings, progress=say)
    settings.serving.autoscaling = AutoscalingSettings(
        min_replicas=1, max_replicas=max_replicas, target_ongoing_requests=4, upscale_delay_s=5,
        downscale_delay_s=600)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "requests.jsonl").unlink(missing_ok=True)
    url = serve_app.run(settings, timeout_s=600)
    samples: list[ReplicaSample] = []
    stop = threading.Event()
    started = time.time()

    def sample() -> None:
        while not stop.wait(1.0):
            try:
                replicas = len(httpx.get(f"{url}/healthz", timeout=5).json()["replicas"])
            except httpx.HTTPError:
                continue
            samples.append(ReplicaSample(t_s=round(time.time() - started, 1), replicas=replicas))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        say(f"Locust: ramp to {users} users over {seconds / 2:.0f} s, {seconds:.0f} s in all")
        with start_locust(url, out_dir, {"FLYWHEEL_SCENARIO": "predict"}, users=users,
                          spawn_rate=users / (seconds / 2), seconds=seconds) as locust:
            locust.wait(timeout=seconds + 120)
    finally:
        stop.set()
        sampler.join(timeout=10)
        serve_app.shutdown()
    rows = [json.loads(line) for line in (out_dir / "requests.jsonl").read_text().splitlines() if line.strip()]
    answered = [r for r in rows if r["kind"] == "predict" and r["status"] == 200]
    scaled = next((s.t_s for s in samples if s.replicas > 1), None)
    cut = started + scaled if scaled is not None else None
    before = [r["latency_ms"] for r in answered if cut is None or r["t"] < cut]
    after = [r["latency_ms"] for r in answered if cut is not None and r["t"] >= cut]
    return AutoscaleBenchReport(
        seconds=seconds, users=users, requests=len(rows), failed_requests=locust_failures(out_dir),
        scaled_up_at_s=scaled, p99_before_ms=percentile(before, 0.99), p99_after_ms=percentile(after, 0.99),
        max_replicas_seen=max((s.replicas for s in samples), default=0), replicas=samples)
