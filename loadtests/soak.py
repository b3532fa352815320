"""`flywheel bench soak`: steady traffic for minutes, a hot swap every so often; failures and memory growth.

Starts the platform (Serve app and curator; no scheduler, this driver moves the alias itself), runs
a Locust scenario (`mixed`: every answer rated, most with a correction, so the feedback path and the
curator work too; `swap`: predict only), and alternates the champion between two ready adapter
versions every `swap_every_s`: the driver of the swap-under-load scenario. Every `sample_every_s` it
records the resident memory of the Serve replicas and their children (vLLM's engine core) and of this
process (the curator).
Memory growth is measured from the first sample after warm-up to the last one.

`hostile` adds what a hostile-but-valid client sends (prompts of digit groups at the size limit,
ratings for request ids that never existed) and reports, besides memory: 5xx answers (goal 0), how long
the curator needs to catch up once the load stops (goal < 5 s), and how much the feedback stores grow
on disk per 1 000 requests with retention on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, Field

from feedback.curator import feedback_status
from flywheel.config import DEMO_MODEL, Settings
from flywheel.registry import Registry, registry_for
from flywheel.stats import percentile
from loadtests.demo import DemoPlan, locust_failures, platform, start_locust
from training.demo_bootstrap import bootstrap, train_demo_adapter

log = logging.getLogger("flywheel.soak")


class MemorySample(BaseModel):
    t_s: float
    total_mb: float
    by_process: dict[str, float]


class SoakReport(BaseModel):
    scenario: str
    seconds: float
    requests: int
    failed_requests: int
    swaps: int
    p50_ms: float | None
    p99_ms: float | None
    baseline_mb: float = Field(description="Resident memory of the serving processes after warm-up.")
    final_mb: float
    rss_growth: float = Field(description="final / baseline - 1 (goal < 0.10).")
    server_errors: int = Field(description="Answers with a 5xx status (goal 0).")
    curator_lag_s: float | None = Field(description="Seconds the curator needed to catch up after the load "
                                        "stopped (local log; goal < 5).")
    disk_mb_per_1000_requests: float = Field(description="Growth of the feedback stores on disk after warm-up.")
    samples: list[MemorySample]

    def summary(self) -> str:
        lag = "-" if self.curator_lag_s is None else f"{self.curator_lag_s:.1f} s"
        return (f"soak ({self.scenario}) {self.seconds / 60:.1f} min: {self.requests} requests, "
                f"{self.failed_requests} failed (goal 0), {self.server_errors} 5xx, {self.swaps} swaps; "
                f"p50 {self.p50_ms or 0:.0f} ms, p99 {self.p99_ms or 0:.0f} ms; "
                f"resident memory {self.baseline_mb:.0f} MB after warm-up -> {self.final_mb:.0f} MB "
                f"= {self.rss_growth:+.1%} (goal < 10%); curator caught up {lag} after the load (goal < 5 s); "
                f"feedback stores +{self.disk_mb_per_1000_requests:.2f} MB per 1000 requests")


def serving_processes(app_name: str) -> dict[str, psutil.Process]:
    """This process and every Serve replica of `app_name`, with their children, by a readable name."""
    found = {"driver+curator": psutil.Process()}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"ServeReplica:{app_name}:" in cmdline:
            name = cmdline.split(f"ServeReplica:{app_name}:", 1)[1].split()[0]
            found[f"{name}[{proc.pid}]"] = proc
            for child in proc.children(recursive=True):
                found[f"{name}[{proc.pid}]/child[{child.pid}]"] = child
    return found


def _rss_mb(processes: dict[str, psutil.Process]) -> dict[str, float]:
    sizes = {}
    for name, proc in processes.items():
        try:
            sizes[name] = proc.memory_info().rss / 2**20
        except psutil.Error:  # a process that went away counts as nothing
            sizes[name] = 0.0
    return sizes


def two_ready_versions(settings: Settings, registry: Registry, say: Callable[[str], None]) -> tuple[str, str]:
    """The champion and another ready version to swap with (the demo trains one if there is none)."""
    champion = registry.alias("champion")
    others = [m.version for m in registry.versions() if m.status == "ready" and m.version != champion]
    if champion and others:
        return champion, others[-1]
    if settings.model.base != DEMO_MODEL or champion is None:
        raise RuntimeError("the soak swaps between two ready adapter versions; the registry has fewer")
    say("training a second demo adapter to swap with")
    return champion, train_demo_adapter(settings, registry, distribution="drifted", seed=7, progress=say).version


def _feedback_disk_mb(settings: Settings) -> float:
    return sum(feedback_status(settings).disk_bytes.values()) / 2**20


def _curator_catch_up_s(settings: Settings, timeout_s: float = 300.0) -> float | None:
    """Seconds until the curator has read everything logged (local log only; None for Kafka)."""
    if settings.feedback.kafka_bootstrap:
        return None
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        status = feedback_status(settings)
        if all(status.positions.get(p, 0) >= end for p, end in status.log_end.items()):
            return time.monotonic() - started
        time.sleep(0.2)
    return timeout_s


def _requests_logged(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.exists() else 0


def run_soak(settings: Settings, *, out_dir: Path, minutes: float = 10.0, swap_every_s: float = 60.0,
             scenario: Literal["mixed", "swap", "hostile"] = "mixed", users: int = 4, warmup_s: float = 60.0,
             sample_every_s: float = 10.0, say: Callable[[str], None] = print) -> SoakReport:
    settings = settings.model_copy(deep=True)
    settings.retrain.schedule_enabled = False  # this driver moves the alias; no retrains mid-soak
    settings.serving.app_name = "flywheel-soak"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "requests.jsonl").unlink(missing_ok=True)
    bootstrap(settings, progress=say)
    registry = registry_for(settings)
    versions = two_ready_versions(settings, registry, say)
    seconds = minutes * 60
    samples: list[MemorySample] = []
    swaps = 0
    requests_log = out_dir / "requests.jsonl"
    warm_disk: tuple[int, float] | None = None  # (requests so far, MB on disk) once warm
    with platform(settings, DemoPlan(), "/soak") as (url, _):
        started = time.monotonic()
        env = {"FLYWHEEL_SCENARIO": scenario, "FLYWHEEL_DRIFT_START": "0.5", "FLYWHEEL_DRIFT_END": "0.5",
               "FLYWHEEL_MAX_PROMPT_CHARS": str(settings.serving.max_prompt_chars)}
        with start_locust(url, out_dir, env, users=users, spawn_rate=users, seconds=seconds + 60) as locust:
            next_swap, next_sample = started + swap_every_s, started
            while locust.poll() is None and (now := time.monotonic()) - started < seconds:
                if warm_disk is None and now - started >= warmup_s:
                    warm_disk = (_requests_logged(requests_log), _feedback_disk_mb(settings))
                if now >= next_sample:
                    sizes = _rss_mb(serving_processes(settings.serving.app_name))
                    samples.append(MemorySample(t_s=now - started, total_mb=sum(sizes.values()), by_process=sizes))
                    say(f"{now - started:5.0f} s  resident {samples[-1].total_mb:.0f} MB  swaps {swaps}")
                    next_sample += sample_every_s
                if now >= next_swap:
                    target = versions[(swaps + 1) % 2]
                    registry.promote(target, actor="soak", reason="swap under load")
                    swaps, next_swap = swaps + 1, next_swap + swap_every_s
                time.sleep(0.5)
        elapsed = time.monotonic() - started
        lag = _curator_catch_up_s(settings)
        disk_end = (_requests_logged(requests_log), _feedback_disk_mb(settings))
    rows = [json.loads(line) for line in requests_log.read_text().splitlines() if line]
    latencies = [r["latency_ms"] for r in rows if r["kind"] == "predict" and r["status"] == 200]
    warm = [s for s in samples if s.t_s >= warmup_s] or samples
    report = SoakReport(
        scenario=scenario, seconds=elapsed, requests=len(rows), failed_requests=locust_failures(out_dir), swaps=swaps,
        p50_ms=percentile(latencies, 0.5), p99_ms=percentile(latencies, 0.99),
        baseline_mb=warm[0].total_mb, final_mb=warm[-1].total_mb,
        rss_growth=warm[-1].total_mb / warm[0].total_mb - 1, samples=samples,
        server_errors=sum(r["status"] >= 500 for r in rows), curator_lag_s=lag,
        disk_mb_per_1000_requests=_per_1000(warm_disk or (0, 0.0), disk_end),
    )
    (out_dir / "soak.json").write_text(report.model_dump_json(indent=2))
    return report


def _per_1000(warm: tuple[int, float], end: tuple[int, float]) -> float:
    requests = end[0] - warm[0]
    return (end[1] - warm[1]) / requests * 1000 if requests > 0 else 0.0
