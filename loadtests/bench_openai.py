"""`flywheel bench openai`: flywheel's OpenAI API against vLLM's own OpenAI server, ratios in one run.

Same box, same base, same adapter, greedy decoding, one after the other (never both loaded at once):

1. throughput at 16 concurrent chat completions, flywheel ÷ vLLM (goal >= 0.9)
2. p50 latency of one chat completion at a time, flywheel ÷ vLLM (goal <= 1.1)
3. p50 time to the first streamed token, flywheel ÷ vLLM (goal <= 1.2)
4. flywheel's /v1/chat/completions p50 ÷ its /predict p50
5. flywheel with 2, 8 and 32 tasks on one replica (each a copy of the adapter): p50 and throughput
6. 1-3 again with `serving.ingress: haproxy` (HAProxy in front of the gateway, the default); 1-5 run with
   `serving.ingress: serve` (Serve's own proxy)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from flywheel.bases import context_length
from flywheel.config import Settings
from flywheel.registry import known_tasks, registry_for
from training.demo_bootstrap import bootstrap

PROMPT = "Analyze the sentiment of this news: Acme shares surged after record quarterly profits"
MAX_TOKENS = 32


class Side(BaseModel):
    rps_at_16: float
    p50_ms: float = Field(description="One request at a time.")
    p50_at_16_ms: float = Field(description="While 16 run at once (the throughput phase).")
    ttft_p50_ms: float


class Ratios(BaseModel):
    """One flywheel side over vLLM's."""

    throughput: float
    p50: float
    p50_at_16: float
    ttft: float

    @classmethod
    def of(cls, ours: Side, vllm: Side) -> Ratios:
        return cls(throughput=ours.rps_at_16 / vllm.rps_at_16, p50=ours.p50_ms / vllm.p50_ms,
                   p50_at_16=ours.p50_at_16_ms / vllm.p50_at_16_ms, ttft=ours.ttft_p50_ms / vllm.ttft_p50_ms)


class OpenAIBenchReport(BaseModel):
    vllm: Side
    flywheel: Side = Field(description="Behind Serve's own proxy (`serving.ingress: serve`).")
    flywheel_haproxy: Side = Field(description="Behind HAProxy (`serving.ingress: haproxy`, the default).")
    ratios: Ratios
    haproxy_ratios: Ratios
    chat_over_predict_p50: float
    by_tasks: dict[int, dict[str, float]]

    def lines(self) -> list[str]:
        tasks = "; ".join(f"{n} tasks: p50 {r['p50_ms']:.0f} ms, {r['rps_at_16']:.1f} rps"
                          for n, r in self.by_tasks.items())
        v, lines = self.vllm, []
        for name, ours, r in (("serve proxy", self.flywheel, self.ratios),
                              ("haproxy", self.flywheel_haproxy, self.haproxy_ratios)):
            lines += [
                f"[{name}] throughput at 16: flywheel {ours.rps_at_16:.1f} / vLLM {v.rps_at_16:.1f} rps = "
                f"{r.throughput:.2f} (goal >= 0.9)",
                f"[{name}] p50 one at a time: flywheel {ours.p50_ms:.0f} / vLLM {v.p50_ms:.0f} ms = {r.p50:.2f} "
                "(goal <= 1.1)",
                f"[{name}] p50 at 16 concurrent: flywheel {ours.p50_at_16_ms:.0f} / vLLM {v.p50_at_16_ms:.0f} ms = "
                f"{r.p50_at_16:.2f} (goal <= 1.1)",
                f"[{name}] first streamed token p50: flywheel {ours.ttft_p50_ms:.0f} / vLLM {v.ttft_p50_ms:.0f} ms = "
                f"{r.ttft:.2f} (goal <= 1.2)",
            ]
        return [*lines, f"/v1/chat/completions p50 / /predict p50 = {self.chat_over_predict_p50:.2f}", tasks]


async def _chat(client: httpx.AsyncClient, url: str, model: str) -> float:
    started = time.perf_counter()
    r = await client.post(f"{url}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
        "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - started


async def _first_token(client: httpx.AsyncClient, url: str, model: str) -> float:
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            delta = choices[0].get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                return time.perf_counter() - started  # the first text, reasoning or answer
    return time.perf_counter() - started


async def _measure(url: str, models: list[str], seconds: float, samples: int = 20) -> Side:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=24)) as client:
        for model in models[:3]:
            await _chat(client, url, model)  # warm-up (and each adapter loaded)
        p50 = statistics.median([await _chat(client, url, models[i % len(models)]) for i in range(samples)])
        ttft = statistics.median([await _first_token(client, url, models[i % len(models)]) for i in range(samples)])
        loaded: list[float] = []
        deadline = time.monotonic() + seconds

        async def worker(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                loaded.append(await _chat(client, url, models[i % len(models)]))
                i += 16

        await asyncio.gather(*(worker(n) for n in range(16)))
    return Side(rps_at_16=len(loaded) / seconds, p50_ms=p50 * 1000, p50_at_16_ms=statistics.median(loaded) * 1000,
                ttft_p50_ms=ttft * 1000)


def _vllm_server(settings: Settings, adapter: Path, port: int, say: Callable[[str], None]) -> subprocess.Popen:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", settings.base_model_path,
               "--port", str(port), "--host", "127.0.0.1", "--enable-lora", "--lora-modules", f"demo={adapter}",
               "--max-lora-rank", str(settings.vllm.max_lora_rank), "--max-loras", str(settings.vllm.max_loras),
               "--max-model-len", str(context_length(settings)), "--enforce-eager",
               "--max-num-seqs", str(settings.vllm.max_num_seqs)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm.cpu_kvcache_gib)}
    say("starting vLLM's OpenAI server: " + " ".join(command[2:]))
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait(url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not come up in {timeout_s:.0f} s")


def add_tasks(settings: Settings, adapters: list[Path], count: int, versions: int = 1, prefix: str = "bench"
              ) -> list[str]:
    """Tasks <prefix>-1..N, each a copy of the default task with `versions` copies of one of `adapters`
    (registered versions of the default task, taken in turn) registered, the last one its champion."""
    names = []
    source = registry_for(settings)
    spec = known_tasks(settings)[settings.default_task]
    for i in range(1, count + 1):
        name, adapter = f"{prefix}-{i}", adapters[(i - 1) % len(adapters)]
        registry = registry_for(settings, name)
        if registry.alias("champion") is None:
            registry.save_task_spec(spec.model_copy(update={"name": name}))
            for v in range(versions):
                copy = settings.home / "bench-adapters" / name / str(v)
                shutil.copytree(adapter, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
                version = registry.register(copy, base=source.manifest(adapter.name).base_model).version
            registry.promote(version, actor="bench")
        names.append(name)
    return names


def run_openai_bench(settings: Settings, *, seconds: float = 15.0, say: Callable[[str], None] = print
                     ) -> OpenAIBenchReport:
    from services import app as serve_app

    bootstrap(settings, progress=say)
    registry = registry_for(settings)
    champion = registry.alias("champion")
    if champion is None:
        raise RuntimeError(f"task {settings.default_task} has no champion to benchmark")
    adapter = registry.local_path(champion)

    port = serve_app.free_port()
    server = _vllm_server(settings, adapter, port, say)
    try:
        vllm_url = f"http://127.0.0.1:{port}"
        _wait(vllm_url)
        say("measuring vLLM's server")
        vllm = asyncio.run(_measure(vllm_url, ["demo"], seconds))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)

    say("starting flywheel behind Serve's proxy")
    url = serve_app.run(_with_ingress(settings, "serve"), timeout_s=600)
    try:
        say("measuring flywheel")
        ours = asyncio.run(_measure(url, [settings.default_task], seconds))
        predict = asyncio.run(_predict_p50(url))
        by_tasks = {}
        for count in (2, 8, 32):
            tasks = add_tasks(settings, [adapter], count)
            time.sleep(5)  # replicas discover new tasks every 2 s
            say(f"measuring flywheel with {count} tasks")
            side = asyncio.run(_measure(url, tasks, seconds / 2, samples=max(10, count)))
            by_tasks[count] = {"p50_ms": side.p50_ms, "rps_at_16": side.rps_at_16}
    finally:
        serve_app.shutdown()

    say("starting flywheel behind HAProxy (a Ray of its own)")
    url = serve_app.run(_with_ingress(settings, "haproxy"), timeout_s=600)
    try:
        say("measuring flywheel behind HAProxy")
        haproxy = asyncio.run(_measure(url, [settings.default_task], seconds))
    finally:
        serve_app.shutdown()
    return OpenAIBenchReport(
        vllm=vllm, flywheel=ours, flywheel_haproxy=haproxy, ratios=Ratios.of(ours, vllm),
        haproxy_ratios=Ratios.of(haproxy, vllm), chat_over_predict_p50=ours.p50_ms / predict, by_tasks=by_tasks,
    )


def _with_ingress(settings: Settings, ingress: str) -> Settings:
    return settings.model_copy(update={"serving": settings.serving.model_copy(update={"ingress": ingress})})


async def _predict_p50(url: str, samples: int = 20) -> float:
    async with httpx.AsyncClient(timeout=120) as client:
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            (await client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS})).raise_for_status()
            latencies.append(time.perf_counter() - started)
    return statistics.median(latencies) * 1000
