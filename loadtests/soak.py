"""`flywheel bench soak`: steady traffic for minutes, a hot swap every so often; failures and memory growth.

Starts the platform (Serve app and curator; no scheduler, this driver moves the alias itself), runs
a Locust scenario (`mixed`: every answer rated, most with a correction, so the feedback path and the
curator work too; `swap`: predict only), and alternates the champion between two ready adapter
versions every `swap_every_s`: the driver of the swap-under-load scenario. Every `sample_every_s` it
records the resident memory of the Serve replicas and their children (vLLM's engine core) and of this
process (the curator).
Memory growth is measured from the first sample after warm-up to the last one.

`hostile` runs in two halves on one platform, so the comparison is a ratio within one run: first the
mixed traffic alone, then the same traffic beside a hostile-but-valid client (prompts and corrections of
every adversarial shape at limits raised to 64 000 characters, a chunked body of 100 MB; the
corrections rate request ids that never existed, so they are accepted and masked whatever the base's
context). It reports the normal traffic's `/predict` p99 in each half (goal: ≤
1.5× with the hostile clients), the replicas' resident memory across the hostile half (goal: flat), what
the hostile clients got back (any 4xx is right; 5xx answers: goal 0), how many bytes of the streamed
body the client got to send, how long the curator needs to catch up once the load stops
(goal < 5 s), and how much the feedback stores grow on disk per 1 000 requests with retention on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


class PhaseReport(BaseModel):
    """One stretch of the soak under one Locust scenario."""

    name: str
    seconds: float
    requests: int
    failed_requests: int
    predict_p50_ms: float | None = Field(description="The normal traffic's /predict p50 (answered 200, after "
                                                     "warm-up).")
    predict_p99_ms: float | None
    rss_start_mb: float = Field(description="Resident memory of the serving processes at the phase's first sample "
                                            "(after warm-up in the first phase).")
    rss_end_mb: float
    hostile_answers: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="What each hostile shape got back: HTTP status (0: the server closed the "
                                          "connection before the client finished sending) -> count.")
    streamed_mb_sent: float | None = Field(
        None, description="The most of the 100 MB chunked body a client got to send (an ingress may drain a refused "
                          "body; what must not grow is the replicas' memory).")


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
    phases: list[PhaseReport]
    hostile_p99_ratio: float | None = Field(
        None, description="hostile: the normal traffic's /predict p99 beside the hostile clients / without them "
                          "(goal <= 1.5).")
    hostile_rss_growth: float | None = Field(
        None, description="hostile: resident memory at the end of the hostile half / at its start - 1 (goal: flat).")
    samples: list[MemorySample]

    def summary(self) -> str:
        lag = "-" if self.curator_lag_s is None else f"{self.curator_lag_s:.1f} s"
        lines = [
            f"soak ({self.scenario}) {self.seconds / 60:.1f} min: {self.requests} requests, "
            f"{self.failed_requests} failed (goal 0), {self.server_errors} 5xx, {self.swaps} swaps; "
            f"p50 {self.p50_ms or 0:.0f} ms, p99 {self.p99_ms or 0:.0f} ms; "
            f"resident memory {self.baseline_mb:.0f} MB after warm-up -> {self.final_mb:.0f} MB "
            f"= {self.rss_growth:+.1%} (goal < 10%); curator caught up {lag} after the load (goal < 5 s); "
            f"feedback stores +{self.disk_mb_per_1000_requests:.2f} MB per 1000 requests"]
        if self.hostile_p99_ratio is not None and self.hostile_rss_growth is not None:
            calm, hostile = self.phases
            lines.append(
                f"beside hostile clients: /predict p99 {calm.predict_p99_ms or 0:.0f} -> "
                f"{hostile.predict_p99_ms or 0:.0f} ms = {self.hostile_p99_ratio:.2f}x (goal <= 1.5x); resident "
                f"memory {hostile.rss_start_mb:.0f} -> {hostile.rss_end_mb:.0f} MB = {self.hostile_rss_growth:+.1%} "
                f"(goal flat); {hostile.streamed_mb_sent or 0:.0f} MB of the 100 MB streamed body sent")
            lines += [f"  {shape}: " + ", ".join(f"{count} x {status}" for status, count in sorted(answers.items()))
                      for shape, answers in sorted(hostile.hostile_answers.items())]
        return "\n".join(lines)


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


HOSTILE_PROMPT_CHARS = 64_000  # a long R1 context: the limit a deployment raises, and the length attacked


def run_soak(settings: Settings, *, out_dir: Path, minutes: float = 10.0, swap_every_s: float = 60.0,
             scenario: Literal["mixed", "swap", "hostile"] = "mixed", users: int = 4, warmup_s: float = 60.0,
             sample_every_s: float = 10.0, say: Callable[[str], None] = print) -> SoakReport:
    settings = settings.model_copy(deep=True)
    settings.retrain.schedule_enabled = False  # this driver moves the alias; no retrains mid-soak
    settings.serving.app_name = "flywheel-soak"
    if scenario == "hostile":  # both halves run with the raised limits: only the clients differ
        settings.serving.max_prompt_chars = max(settings.serving.max_prompt_chars, HOSTILE_PROMPT_CHARS)
        settings.feedback.max_correction_chars = max(settings.feedback.max_correction_chars, HOSTILE_PROMPT_CHARS)
    out_dir.mkdir(parents=True, exist_ok=True)
    bootstrap(settings, progress=say)
    registry = registry_for(settings)
    versions = two_ready_versions(settings, registry, say)
    seconds = minutes * 60
    phases = ([Phase("calm", "mixed", seconds / 2, users), Phase("hostile", "hostile", seconds / 2, users + 1)]
              if scenario == "hostile" else [Phase(scenario, scenario, seconds, users)])
    samples: list[MemorySample] = []
    swapper = Swapper(registry, versions, swap_every_s)
    with platform(settings, DemoPlan(), "/soak") as (url, _):
        started = time.monotonic()
        runs = [_drive(phase, settings, url, out_dir / phase.name if len(phases) > 1 else out_dir, started=started,
                       warmup_s=warmup_s if phase is phases[0] else 0.0, sample_every_s=sample_every_s,
                       samples=samples, swapper=swapper, say=say)
                for phase in phases]
        elapsed = time.monotonic() - started
        lag = _curator_catch_up_s(settings)
        disk_end_mb = _feedback_disk_mb(settings)
    rows = [row for run in runs for row in run.rows]
    latencies = [r["latency_ms"] for r in rows if r["kind"] == "predict" and r["status"] == 200]
    reports = [run.report() for run in runs]
    warm = [s for s in samples if s.t_s >= warmup_s] or samples
    report = SoakReport(
        scenario=scenario, seconds=elapsed, requests=len(rows), failed_requests=sum(r.failed_requests for r in reports),
        swaps=swapper.swaps, p50_ms=percentile(latencies, 0.5), p99_ms=percentile(latencies, 0.99),
        baseline_mb=warm[0].total_mb, final_mb=warm[-1].total_mb,
        rss_growth=warm[-1].total_mb / warm[0].total_mb - 1, samples=samples,
        server_errors=sum(r["status"] >= 500 for r in rows), curator_lag_s=lag,
        disk_mb_per_1000_requests=_per_1000((runs[0].requests_when_warm, runs[0].disk_mb_when_warm),
                                            (len(rows), disk_end_mb)),
        phases=reports,
    )
    if scenario == "hostile":
        calm, hostile = reports
        if calm.predict_p99_ms and hostile.predict_p99_ms:
            report.hostile_p99_ratio = hostile.predict_p99_ms / calm.predict_p99_ms
        report.hostile_rss_growth = hostile.rss_end_mb / hostile.rss_start_mb - 1
    (out_dir / "soak.json").write_text(report.model_dump_json(indent=2))
    return report


@dataclass(frozen=True)
class Phase:
    name: str
    locust_scenario: str
    seconds: float
    users: int


@dataclass
class Swapper:
    """Alternates the champion between two ready versions every `every_s`, across phases."""

    registry: Registry
    versions: tuple[str, str]
    every_s: float
    swaps: int = 0
    next_at: float | None = None

    def tick(self, now: float) -> None:
        if self.next_at is None:
            self.next_at = now + self.every_s
        elif now >= self.next_at:
            self.registry.promote(self.versions[(self.swaps + 1) % 2], actor="soak", reason="swap under load")
            self.swaps, self.next_at = self.swaps + 1, self.next_at + self.every_s


@dataclass
class PhaseRun:
    phase: Phase
    out_dir: Path
    seconds: float
    samples: list[MemorySample]
    rows: list[dict[str, Any]]
    requests_when_warm: int
    disk_mb_when_warm: float
    warm_at: float  # wall-clock time warm-up ended: answers before it are not timed

    def report(self) -> PhaseReport:
        latencies = [r["latency_ms"] for r in self.rows
                     if r["kind"] == "predict" and r["status"] == 200 and r["t"] >= self.warm_at]
        hostile: dict[str, dict[str, int]] = {}
        for row in self.rows:
            if row["kind"].startswith("hostile_"):
                answers = hostile.setdefault(row["kind"].removeprefix("hostile_"), {})
                answers[str(row["status"])] = answers.get(str(row["status"]), 0) + 1
        streamed = [r["bytes_sent"] for r in self.rows if "bytes_sent" in r]
        return PhaseReport(
            name=self.phase.name, seconds=self.seconds, requests=len(self.rows),
            failed_requests=locust_failures(self.out_dir),
            predict_p50_ms=percentile(latencies, 0.5), predict_p99_ms=percentile(latencies, 0.99),
            rss_start_mb=self.samples[0].total_mb, rss_end_mb=self.samples[-1].total_mb, hostile_answers=hostile,
            streamed_mb_sent=max(streamed) / 2**20 if streamed else None)


def _drive(phase: Phase, settings: Settings, url: str, out_dir: Path, *, started: float, warmup_s: float,
           sample_every_s: float, samples: list[MemorySample], swapper: Swapper, say: Callable[[str], None]
           ) -> PhaseRun:
    """Run one phase's Locust load, sampling memory and swapping the champion as it goes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    requests_log = out_dir / "requests.jsonl"
    requests_log.unlink(missing_ok=True)
    env = {"FLYWHEEL_SCENARIO": phase.locust_scenario, "FLYWHEEL_DRIFT_START": "0.5", "FLYWHEEL_DRIFT_END": "0.5",
           "FLYWHEEL_MAX_PROMPT_CHARS": str(settings.serving.max_prompt_chars),
           "FLYWHEEL_MAX_CORRECTION_CHARS": str(settings.feedback.max_correction_chars), "FLYWHEEL_HOSTILE_USERS": "1"}
    say(f"phase {phase.name}: {phase.users} Locust users, {phase.seconds:.0f} s")
    phase_started, warm_at = time.monotonic(), time.time() + warmup_s
    phase_samples: list[MemorySample] = []
    warm: tuple[int, float] | None = None  # (requests so far, MB on disk) once warm
    with start_locust(url, out_dir, env, users=phase.users, spawn_rate=phase.users, seconds=phase.seconds + 60
                      ) as locust:
        next_sample = phase_started
        while locust.poll() is None and (now := time.monotonic()) - phase_started < phase.seconds:
            if warm is None and now - phase_started >= warmup_s:
                warm = (_requests_logged(requests_log), _feedback_disk_mb(settings))
            if now >= next_sample:
                sizes = _rss_mb(serving_processes(settings.serving.app_name))
                sample = MemorySample(t_s=now - started, total_mb=sum(sizes.values()), by_process=sizes)
                if now - phase_started >= warmup_s:
                    phase_samples.append(sample)
                samples.append(sample)
                say(f"{now - started:5.0f} s  resident {sample.total_mb:.0f} MB  swaps {swapper.swaps}")
                next_sample += sample_every_s
            swapper.tick(now)
            time.sleep(0.5)
    sizes = _rss_mb(serving_processes(settings.serving.app_name))
    phase_samples.append(MemorySample(t_s=time.monotonic() - started, total_mb=sum(sizes.values()), by_process=sizes))
    samples.append(phase_samples[-1])
    rows = [json.loads(line) for line in requests_log.read_text().splitlines() if line] if requests_log.exists() else []
    return PhaseRun(phase, out_dir, time.monotonic() - phase_started, phase_samples, rows,
                    *(warm or (0, _feedback_disk_mb(settings))), warm_at=warm_at)
def _per_1000(warm: tuple[int, float], end: tuple[int, float]) -> float:
    requests = end[0] - warm[0]
    return (end[1] - warm[1]) / requests * 1000 if requests > 0 else 0.0
