"""`flywheel bench openai`: flywheel's OpenAI API against vLLM's own OpenAI server, ratios in one run.

Same box, same base, same adapter, greedy decoding. vLLM's server runs beside flywheel and the two are asked
in turns (blocks of requests, one server idle while the other answers), so a box that speeds up or slows down
during the run moves both sides alike:

1. p50 latency of one chat completion at a time, flywheel ÷ vLLM (goal <= 1.1)
2. the same for answers of R1 length (`ignore_eos`, LONG_TOKENS tokens: a DeepSeek-R1-Distill model thinks for
   hundreds of tokens, where the demo model answers in about ten)
3. p50 time to the first streamed token, flywheel ÷ vLLM (goal <= 1.2)
4. throughput at 16 concurrent chat completions (the servers take turns at it too, after a warm-up at 16 that
   is not counted: a server's first seconds under load are slower), flywheel ÷ vLLM (goal >= 0.9), and the p50
   meanwhile. The default setup is loaded in RUNS consecutive runs, each of TURNS windows per server, so a
   decline from run to run in one process shows (goal: the runs within 10 % of each other)
5. flywheel's /v1/chat/completions p50 ÷ its /predict p50
6. flywheel with 2, 8 and 32 tasks on one replica (each a copy of the adapter): p50 and throughput
7. what each part of the default costs: 1-4 again with the loop off, with the request log sent through Ray's
   log forwarding to the driver instead of its file, and with no request log

1-4 run for each of SETUPS (ingress × topology), the default last, as `flywheel up` runs it: the loop on (its
curator ingesting every prediction event), prediction events logged, the request log in its file. 5-6 on the
default, after the others so that their tasks are not there for the others to watch; then 7.
The rate limit per caller is lifted: the benchmark measures serving, not `auth.rate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from flywheel.bases import context_length, served_base
from flywheel.config import Settings
from flywheel.registry import Registry, known_tasks, registry_for
from training.demo_bootstrap import bootstrap

PROMPT = "Analyze the sentiment of this news: Acme shares surged after record quarterly profits"
MAX_TOKENS = 32
LONG_TOKENS = 256  # an R1-length answer: what a DeepSeek-R1-Distill model's thinking and answer come to
TURNS = 4  # blocks per measure and server, alternating
RUNS = 3  # consecutive throughput runs of the default setup
WARM_LOAD_S = 8.0  # the uncounted warm-up at 16 concurrent, both servers in turns
IDLE_S = 1.5  # between blocks: vLLM's engine busy-polls for 1 s after its last request, then sleeps


class Side(BaseModel):
    p50_ms: float = Field(description="One request at a time.")
    long_p50_ms: float = Field(description=f"One request at a time, {LONG_TOKENS}-token answers.")
    ttft_p50_ms: float
    rps_at_16: float = Field(description="Over all the runs.")
    p50_at_16_ms: float = Field(description="While 16 run at once (the throughput phase).")
    rps_by_run: list[float] = Field(description="Throughput in each consecutive run, in order.")
    keeper_core_per_100_rps: float | None = Field(
        None, description="The loop's keeper (curator, scheduler, canary controller) over the throughput runs: the "
        "share of one core it used per 100 requests/s served (each request one prediction event to curate).")

    @property
    def run_spread(self) -> float:
        """Slowest run's throughput over the fastest's (1: steady)."""
        return min(self.rps_by_run) / max(self.rps_by_run)


class Ratios(BaseModel):
    """flywheel's side over vLLM's."""

    p50: float
    long_p50: float
    ttft: float
    throughput: float
    p50_at_16: float

    @classmethod
    def of(cls, ours: Side, vllm: Side) -> Ratios:
        return cls(p50=ours.p50_ms / vllm.p50_ms, long_p50=ours.long_p50_ms / vllm.long_p50_ms,
                   ttft=ours.ttft_p50_ms / vllm.ttft_p50_ms, throughput=ours.rps_at_16 / vllm.rps_at_16,
                   p50_at_16=ours.p50_at_16_ms / vllm.p50_at_16_ms)


class Pair(BaseModel):
    """flywheel behind one ingress and vLLM's server, asked in turns."""

    flywheel: Side
    vllm: Side
    ratios: Ratios

    def lines(self, name: str) -> list[str]:
        ours, v, r = self.flywheel, self.vllm, self.ratios
        return [
            f"[{name}] p50 one at a time: flywheel {ours.p50_ms:.0f} / vLLM {v.p50_ms:.0f} ms = {r.p50:.2f} "
            "(goal <= 1.1)",
            f"[{name}] p50 one at a time, {LONG_TOKENS}-token answers: flywheel {ours.long_p50_ms:.0f} / vLLM "
            f"{v.long_p50_ms:.0f} ms = {r.long_p50:.2f} (goal <= 1.1)",
            f"[{name}] first streamed token p50: flywheel {ours.ttft_p50_ms:.0f} / vLLM {v.ttft_p50_ms:.0f} ms = "
            f"{r.ttft:.2f} (goal <= 1.2)",
            f"[{name}] throughput at 16: flywheel {ours.rps_at_16:.1f} / vLLM {v.rps_at_16:.1f} rps = "
            f"{r.throughput:.2f} (goal >= 0.9)",
            f"[{name}] p50 at 16 concurrent: flywheel {ours.p50_at_16_ms:.0f} / vLLM {v.p50_at_16_ms:.0f} ms = "
            f"{r.p50_at_16:.2f} (goal <= 1.1)",
        ] + ([
            f"[{name}] throughput by run: flywheel {_rates(ours)} (slowest/fastest {ours.run_spread:.2f}), "
            f"vLLM {_rates(v)} ({v.run_spread:.2f}); flywheel / vLLM by run "
            f"{', '.join(f'{a / b:.2f}' for a, b in zip(ours.rps_by_run, v.rps_by_run, strict=True))} "
            "(goal: slowest/fastest >= 0.9)"] if len(ours.rps_by_run) > 1 else []) + ([
            f"[{name}] the loop's keeper (curator, scheduler, canary controller): "
            f"{ours.keeper_core_per_100_rps:.1%} of a core per 100 requests/s"]
            if ours.keeper_core_per_100_rps is not None else [])


def _rates(side: Side) -> str:
    return ", ".join(f"{rps:.1f}" for rps in side.rps_by_run)


# (serving.ingress, serving.topology): Serve's proxy, then HAProxy with a separate gateway, then the default for a
# lone replica (HAProxy straight to the replica that is the ingress and the engine at once).
SETUPS = (("serve", "fused"), ("haproxy", "split"), ("haproxy", "fused"))
# What the default pays for, each taken away on its own: (name, settings changed).
COSTS = (("loop off", {"loop": {"enabled": False}}),
         ("request log through Ray's forwarding", {"serving": {"request_log": "stderr"}}),
         ("request log off", {"serving": {"request_log": "off"}}))


def setup_name(ingress: str, topology: str) -> str:
    return f"ingress={ingress} topology={topology}"


class OpenAIBenchReport(BaseModel):
    replicas: int = Field(description="flywheel's LLM replicas in every setup; vLLM's server is one.")
    pairs: dict[str, Pair] = Field(description="flywheel with each (serving.ingress, serving.topology) of SETUPS "
                                   "beside vLLM's server.")
    chat_over_predict_p50: float
    by_tasks: dict[int, dict[str, float]]
    costs: dict[str, Pair] = Field(description="The default setup with one part changed (COSTS), beside vLLM's "
                                   "server: compare each with the default's pair.")

    def lines(self) -> list[str]:
        tasks = "; ".join(f"{n} tasks: p50 {r['p50_ms']:.0f} ms, {r['rps_at_16']:.1f} rps"
                          for n, r in self.by_tasks.items())
        pairs = [line for name, pair in self.pairs.items() for line in pair.lines(name)]
        costs = [line for name, pair in self.costs.items() for line in pair.lines(f"default, {name}")]
        return [f"flywheel with {self.replicas} LLM replica(s), vLLM's server with one", *pairs,
                f"/v1/chat/completions p50 / /predict p50 = {self.chat_over_predict_p50:.2f}", tasks, *costs]


class Server(BaseModel):
    url: str
    models: list[str] = Field(description="Asked in turn.")
    keeper_pid: int | None = Field(None, description="flywheel's loop keeper process on this machine, to time.")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def keeper_pid(app_name: str) -> int | None:
    """The process of the app's LoopKeeper replica (a Ray worker titled `ray::ServeReplica:<app>:LoopKeeper`)."""
    title = f"ServeReplica:{app_name}:LoopKeeper".encode()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and title in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


def _body(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0, **extra}


async def _chat(client: httpx.AsyncClient, url: str, model: str, **extra: object) -> float:
    started = time.perf_counter()
    r = await client.post(f"{url}/v1/chat/completions", json=_body(model, **extra))
    r.raise_for_status()
    return time.perf_counter() - started


async def _long_chat(client: httpx.AsyncClient, url: str, model: str) -> float:
    return await _chat(client, url, model, max_tokens=LONG_TOKENS, ignore_eos=True)


async def _first_token(client: httpx.AsyncClient, url: str, model: str) -> float:
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=_body(model, stream=True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            delta = choices[0].get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                return time.perf_counter() - started  # the first text, reasoning or answer
    return time.perf_counter() - started


Probe = Callable[[httpx.AsyncClient, str, str], Awaitable[float]]


async def _in_turns(client: httpx.AsyncClient, servers: list[Server], probe: Probe, per_block: int
                    ) -> list[float]:
    """p50 (ms) of `probe` on each server, asked in TURNS blocks of `per_block`, the first server changing."""
    samples: list[list[float]] = [[] for _ in servers]
    for turn in range(TURNS):
        for i in range(len(servers)):
            k = (i + turn) % len(servers)
            server = servers[k]
            for _ in range(per_block):  # the server's models in turn, across blocks
                samples[k].append(await probe(client, server.url, server.models[len(samples[k]) % len(server.models)]))
            await asyncio.sleep(IDLE_S)
    return [statistics.median(s) * 1000 for s in samples]


async def _load(client: httpx.AsyncClient, servers: list[Server], seconds: float
                ) -> list[tuple[float, float]]:
    """Each server's requests per second and p50 (ms) with 16 in flight: `seconds` each, in TURNS windows, the
    servers taking turns."""
    latencies: list[list[float]] = [[] for _ in servers]
    window = seconds / TURNS

    async def worker(k: int, n: int, deadline: float) -> None:
        server, i = servers[k], n
        while time.monotonic() < deadline:
            latencies[k].append(await _chat(client, server.url, server.models[i % len(server.models)]))
            i += 16

    for turn in range(TURNS):
        for i in range(len(servers)):
            k = (i + turn) % len(servers)
            deadline = time.monotonic() + window
            await asyncio.gather(*(worker(k, n, deadline) for n in range(16)))
            await asyncio.sleep(IDLE_S)
    return [(len(x) / seconds, statistics.median(x) * 1000) for x in latencies]


async def _warm(client: httpx.AsyncClient, server: Server) -> None:
    for model in server.models:
        await _chat(client, server.url, model)  # and each adapter loaded


async def _measure(servers: list[Server], seconds: float, runs: int) -> list[Side]:
    """Each server's side, measured in turns; the throughput phase `runs` times in a row."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=24)) as client:
        for server in servers:
            await _warm(client, server)
        p50 = await _in_turns(client, servers, _chat, 8)
        long_p50 = await _in_turns(client, servers, _long_chat, 2)
        ttft = await _in_turns(client, servers, _first_token, 8)
        await _load(client, servers, WARM_LOAD_S)
        keeper_before = {i: cpu_seconds(s.keeper_pid) for i, s in enumerate(servers) if s.keeper_pid}
        loaded = [await _load(client, servers, seconds) for _ in range(runs)]
    sides = []
    for i, server in enumerate(servers):
        rps = statistics.mean(run[i][0] for run in loaded)
        # the keeper's CPU seconds per request this server took, times 100: its share of a core per 100 requests/s
        keeper = ((cpu_seconds(server.keeper_pid) - keeper_before[i]) / (rps * runs * seconds) * 100
                  if i in keeper_before else None)
        sides.append(Side(p50_ms=p50[i], long_p50_ms=long_p50[i], ttft_p50_ms=ttft[i], rps_at_16=rps,
                          p50_at_16_ms=statistics.median(run[i][1] for run in loaded),
                          rps_by_run=[run[i][0] for run in loaded], keeper_core_per_100_rps=keeper))
    return sides


async def _pair(flywheel: Server, vllm: Server, seconds: float, runs: int = 1) -> Pair:
    ours, theirs = await _measure([flywheel, vllm], seconds, runs)
    return Pair(flywheel=ours, vllm=theirs, ratios=Ratios.of(ours, theirs))


async def _many_tasks(server: Server, seconds: float) -> dict[str, float]:
    """p50 (each task asked in turn, one at a time) and throughput at 16 over all of `server.models`."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=24)) as client:
        await _warm(client, server)
        [p50] = await _in_turns(client, [server], _chat, max(3, len(server.models) // TURNS))
        [(rps, _)] = await _load(client, [server], seconds)
    return {"p50_ms": p50, "rps_at_16": rps}


def _vllm_server(settings: Settings, adapter: Path, port: int, say: Callable[[str], None]) -> subprocess.Popen:
    """vLLM's server on the base flywheel serves (the quantized one, if configured), the adapter named as the task."""
    base = served_base(settings, registry_for(settings)).path
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
               "--port", str(port), "--host", "127.0.0.1",
               "--enable-lora", "--lora-modules", f"{settings.default_task}={adapter}",
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
            for _ in range(versions):
                version = _register_copy(registry, source, adapter)
            registry.promote(version, actor="bench")
        names.append(name)
    return names


def scratch_registry(settings: Settings, root: Path) -> Settings:
    """`settings` on a registry of their own at `root` holding the default task alone, its champion (and the
    quantized base serving runs on, if any) registered anew: a benchmark's tasks never reach the user's registry,
    and the tasks already there never weigh on the benchmark."""
    source = registry_for(settings)
    champion = source.alias("champion")
    if champion is None:
        raise RuntimeError(f"task {settings.default_task} has no champion to benchmark")
    spec = known_tasks(settings)[settings.default_task]
    model = settings.model
    registry = settings.registry.model_copy(update={"uri": str(root)})
    scratch = settings.model_copy(update={"registry": registry, "tasks": [spec]})
    target = registry_for(scratch)
    if model.quantized_base is not None:
        base = source.base_manifest(model.quantized_base)
        path, _ = source.base_path(model.quantized_base, source_sha256=base.source.sha256)
        copied = target.register_base(path, prefix=model.quantized_base.rsplit("-v", 1)[0], source=base.source,
                                      **base.model_dump(include={"method", "quantization", "calibration", "quality",
                                                                 "metrics"}))
        scratch = scratch.model_copy(update={"model": model.model_copy(update={"quantized_base": copied.name})})
    target.save_task_spec(spec)
    target.promote(_register_copy(target, source, source.local_path(champion)), actor="bench")
    return scratch


def _register_copy(registry: Registry, source: Registry, adapter: Path) -> str:
    """A new version of `registry`'s task with the weights of `source`'s version at `adapter`."""
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-adapter-") as copy:
        shutil.copytree(adapter, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        return registry.register(Path(copy), base=source.manifest(adapter.name).base_model).version


def run_openai_bench(settings: Settings, *, seconds: float = 15.0, replicas: int = 1,
                     say: Callable[[str], None] = print) -> OpenAIBenchReport:
    """`replicas`: flywheel's LLM replicas in every setup (vLLM's server is one), for what several cost: behind
    HAProxy with `fused` a TaskRouter picks each request's replica, with `split` a gateway sits in front."""
    bootstrap(settings, progress=say)
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(update={"rate": "1000000/second"})})
    settings = _changed(settings, {"serving": {"replicas": replicas, "autoscaling": None}})
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-openai-") as scratch:
        settings = scratch_registry(settings, Path(scratch) / "registry")
        return _run(settings, seconds, say)


def _run(settings: Settings, seconds: float, say: Callable[[str], None]) -> OpenAIBenchReport:
    from services import app as serve_app

    registry = registry_for(settings)
    adapter = registry.local_path(registry.alias("champion"))
    port = serve_app.free_port()
    server = _vllm_server(settings, adapter, port, say)
    try:
        vllm = Server(url=f"http://127.0.0.1:{port}", models=[settings.default_task])
        _wait(vllm.url)
        pairs: dict[str, Pair] = {}
        for ingress, topology in SETUPS:
            name = setup_name(ingress, topology)
            say(f"starting flywheel ({name}) beside vLLM's server")
            url = serve_app.run(_with_serving(settings, ingress=ingress, topology=topology), timeout_s=600)
            try:
                say(f"measuring flywheel ({name}) and vLLM's server in turns")
                default = (ingress, topology) == SETUPS[-1]
                ours = Server(url=url, models=[settings.default_task],
                              keeper_pid=keeper_pid(settings.serving.app_name) if default else None)
                pairs[name] = asyncio.run(_pair(ours, vllm, seconds, runs=RUNS if default else 1))
                if not default:
                    continue
                predict = asyncio.run(_predict_p50(url))
                chat_over_predict = pairs[name].flywheel.p50_ms / predict
                by_tasks = {}
                for count in (2, 8, 32):
                    tasks = add_tasks(settings, [adapter], count)
                    time.sleep(5)  # replicas discover new tasks every 2 s
                    say(f"measuring flywheel with {count} tasks")
                    by_tasks[count] = asyncio.run(_many_tasks(Server(url=url, models=tasks), seconds / 2))
            finally:
                serve_app.shutdown()  # a Ray of its own for each: HAProxy or not is a Ray-wide choice
        costs = {}
        for name, changed in COSTS:
            say(f"starting flywheel (default, {name}) beside vLLM's server")
            url = serve_app.run(_changed(settings, changed), timeout_s=600)
            try:
                costs[name] = asyncio.run(_pair(Server(url=url, models=[settings.default_task]), vllm, seconds))
            finally:
                serve_app.shutdown()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    return OpenAIBenchReport(replicas=settings.serving.replicas, pairs=pairs, chat_over_predict_p50=chat_over_predict,
                             by_tasks=by_tasks, costs=costs)


def _changed(settings: Settings, changed: dict[str, dict[str, object]]) -> Settings:
    return settings.model_copy(update={section: getattr(settings, section).model_copy(update=fields)
                                       for section, fields in changed.items()})


def _with_serving(settings: Settings, **serving: str) -> Settings:
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=serving)})


async def _predict_p50(url: str, samples: int = 20) -> float:
    async with httpx.AsyncClient(timeout=120) as client:
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            (await client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS})).raise_for_status()
            latencies.append(time.perf_counter() - started)
    return statistics.median(latencies) * 1000
