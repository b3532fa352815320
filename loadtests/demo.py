"""`flywheel demo`: one command that shows the loop working under real HTTP load.

Starts the platform (Serve app, curator, retrain scheduler, canary controller) unless given a URL, runs
the mixed Locust scenario (drifting traffic, simulated raters that correct wrong answers), lets the
scheduler retrain and the gate judge; by default the passing adapter then runs as a canary for half of
the simulated people, and their ratings promote it or roll it back. Reports per adapter version and per
time window what users got: accuracy on original vs drifted prompts, each arm's ratings, latency,
failures, swaps and canary moves. Writes `report.json`,
`learning_curve.png` and Locust's CSV/HTML into the output folder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.auth import KeyStore
from flywheel.config import Settings
from flywheel.registry import CANARY_ALIAS, registry_for, resolve_task
from flywheel.runs import RunState, RunStore
from flywheel.stats import percentile
from training.demo_bootstrap import bootstrap

log = logging.getLogger("flywheel.demo")

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO_ROOT = LOCUSTFILE.parent.parent
SWAP_WINDOW_S = 10.0  # requests this long after an alias move count as "during the swap"


class DemoPlan(BaseModel):
    """How long and how hard the demo drives the platform, and how eagerly its scheduler retrains."""

    users: int = Field(4, ge=1, description="Concurrent Locust users (each a rater).")
    spawn_rate: float = Field(4.0, gt=0)
    max_duration_s: float = Field(420.0, gt=0, description="Stop the load after this long unless a retrain runs.")
    retrain_grace_s: float = Field(600.0, ge=0, description="How much longer the load waits on a running retrain.")
    loops: int = Field(1, ge=1, description="Stop retraining after this many swaps.")
    post_swap_s: float = Field(60.0, ge=0, description="Keep the load this long after the last swap, then stop.")
    drift_start: float = Field(0.2, ge=0, le=1)
    drift_end: float = Field(0.9, ge=0, le=1)
    drift_ramp_s: float = Field(90.0, ge=0)
    correction_p: float = Field(0.8, ge=0, le=1)
    max_tokens: int = Field(48, ge=1)
    schedule_interval_s: float = Field(20.0, gt=0)
    schedule_min_new_examples: int = Field(120, ge=1)
    check_every_s: float = Field(2.0, gt=0, description="How often the scheduler checks.")
    window_s: float = Field(15.0, gt=0, description="Width of a time window in the report.")
    rollout: Literal["direct", "canary"] = Field(
        "canary", description="`canary`: a gate-passed adapter serves `canary_share` of people until their "
        "ratings promote or roll it back; `direct`: it becomes champion at once.")
    canary_share: float = Field(0.5, gt=0, lt=1)
    canary_min_ratings: int = Field(15, ge=2, description="Ratings per arm before the canary's verdict.")

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls()

    @classmethod
    def full(cls) -> DemoPlan:
        return cls(users=8, spawn_rate=8, max_duration_s=1500, loops=2, post_swap_s=120, drift_ramp_s=300,
                   schedule_interval_s=60, schedule_min_new_examples=200, window_s=30)


class VersionStats(BaseModel):
    """What users got from one adapter version (from the raters' ground truth)."""

    requests: int
    accuracy_original: float | None
    accuracy_drifted: float | None
    mean_rating: float | None
    p50_ms: float | None
    p99_ms: float | None


class Window(BaseModel):
    start_s: float = Field(description="Seconds after the load started.")
    requests: int
    failures: int
    drift_share: float | None
    accuracy_original: float | None
    accuracy_drifted: float | None
    mean_rating: float | None
    p50_ms: float | None
    p99_ms: float | None
    versions: dict[str, int] = Field(description="Predictions answered by each adapter version.")
    rating_by_version: dict[str, float] = Field(default_factory=dict, description="Mean rating of each version's "
                                                "answers rated in the window: the arms of a canary.")


class CanaryMove(BaseModel):
    at_s: float = Field(description="Seconds after the load started.")
    version: str
    share: float
    action: str
    reason: str


class Swap(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    at: datetime
    at_s: float = Field(description="Seconds after the load started.")
    from_: str | None = Field(alias="from")
    to: str
    action: str


class RunSummary(BaseModel):
    run_id: str
    trigger: str
    verdict: str
    version: str | None
    seconds: float | None
    message: str = ""


class DemoReport(BaseModel):
    seed: int
    quick: bool
    url: str
    plan: DemoPlan
    load_s: float = Field(description="How long the load ran.")
    champion_before: str | None
    champion_after: str | None
    swaps: list[Swap]
    canary: list[CanaryMove] = Field(default_factory=list, description="The canary's steps, promotion or rollback.")
    runs: list[RunSummary]
    requests: int
    failed_requests: int
    loop_s: float | None = Field(description="First rating → first answer from the first new champion.")
    steady_p99_ms: float | None = Field(description="/predict p99 away from swaps and retrains.")
    swap_p99_ms: float | None = Field(description=f"/predict p99 within {SWAP_WINDOW_S:.0f} s after a swap.")
    swap_p99_over_steady_p99: float | None
    evaluation_s: float | None = Field(None, description="The first judged run's evaluation on the serving "
                                       "replicas: from its `evaluate` stage to its `gate` stage.")
    evaluation_share_of_loop: float | None = Field(None, description="evaluation_s / loop_s.")
    evaluation_p99_ms: float | None = Field(None, description="/predict p99 while a gate scored on the replicas.")
    evaluation_p99_over_steady_p99: float | None = None
    versions: dict[str, VersionStats]
    windows: list[Window]

    def summary(self) -> str:
        lines = [f"champion {self.champion_before} → {self.champion_after}; {len(self.swaps)} swap(s); "
                 f"{self.requests} requests, {self.failed_requests} failed; loop {_fmt(self.loop_s, 's')}"]
        for move in self.canary:
            lines.append(f"  canary {move.action} {move.version} at {move.share:.0%} (+{move.at_s:.0f} s): "
                         f"{move.reason}")
        for version, stats in self.versions.items():
            lines.append(f"  {version}: original {_pct(stats.accuracy_original)}, "
                         f"drifted {_pct(stats.accuracy_drifted)}, rating {_fmt(stats.mean_rating)}, "
                         f"p50 {_fmt(stats.p50_ms, 'ms')}, p99 {_fmt(stats.p99_ms, 'ms')} ({stats.requests} answers)")
        lines.append(f"  p99 during swap {_fmt(self.swap_p99_ms, 'ms')} vs steady {_fmt(self.steady_p99_ms, 'ms')}"
                     f" (ratio {_fmt(self.swap_p99_over_steady_p99)})")
        lines.append(f"  evaluation on the serving replicas {_fmt(self.evaluation_s, 's')} "
                     f"({_pct(self.evaluation_share_of_loop)} of the loop); p99 meanwhile "
                     f"{_fmt(self.evaluation_p99_ms, 'ms')} "
                     f"(ratio to steady {_fmt(self.evaluation_p99_over_steady_p99)})")
        return "\n".join(lines)


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.1f}{unit}" if unit else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _accuracy(rows: list[dict[str, Any]], distribution: str) -> float | None:
    return _mean([float(r["correct"]) for r in rows if r["distribution"] == distribution])


@contextmanager
def platform(settings: Settings, plan: DemoPlan, route_prefix: str) -> Iterator[tuple[str, threading.Event]]:
    """Serve app + curator + scheduler on `settings`; yields (url, event that stops the scheduler)."""
    import ray
    from ray import serve

    from feedback.curator import Curator
    from flywheel.scheduler import RetrainScheduler
    from services import app as serve_app
    from services.loop import canary_controller

    bootstrap(settings)
    # The demo runs the loop's parts itself, its scheduler bounded by the plan's loops: not the app's keeper.
    settings.loop.enabled = False
    ray_was_up = ray.is_initialized()
    stop, stop_scheduler = threading.Event(), threading.Event()
    curator = Curator(settings)
    registry, started = registry_for(settings), time.time()

    def loops_left() -> bool:  # asked right before a launch: a run that just promoted is already counted
        promotions = [e for e in registry.history("champion") if e.action == "promote" and e.at.timestamp() >= started]
        return len(promotions) < plan.loops

    threads = [threading.Thread(target=curator.run, args=(stop,), name="demo-curator", daemon=True)]
    if settings.retrain.schedule_enabled:
        threads.append(RetrainScheduler(settings, stop_scheduler, check_every_s=plan.check_every_s,
                                        may_start=loops_left))
    try:
        url = serve_app.run(settings, route_prefix=route_prefix, timeout_s=600)
        threads.append(canary_controller(settings, stop))
        for thread in threads:
            thread.start()
        yield url, stop_scheduler
    finally:
        stop.set()
        stop_scheduler.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=30)
        curator.close()
        _stop_runs(RunStore.for_settings(settings))
        if ray_was_up:
            serve.delete(settings.serving.app_name)
        else:
            serve_app.shutdown()


def _stop_runs(store: RunStore, grace_s: float = 120.0) -> None:
    """Let a retrain the demo's scheduler started finish (up to `grace_s`), then kill it."""
    deadline = time.monotonic() + grace_s
    while (running := [r for r in store.list() if r.state == RunState.RUNNING]) and time.monotonic() < deadline:
        time.sleep(1.0)
    for record in running:
        log.warning("event=demo_kill_run run_id=%s stage=%s", record.run_id, record.stage)
        with suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)  # the scheduler starts each run in its own session


def _drive(url: str, plan: DemoPlan, seed: int, out_dir: Path, champion: Callable[[], str | None],
           retraining: Callable[[], bool], on_loops_done: Callable[[], None], keys: list[str]) -> float:
    """Run the mixed Locust scenario until `plan.loops` swaps plus `plan.post_swap_s`, or the time limit.

    At the time limit a retrain in progress gets up to `plan.retrain_grace_s` more, under the same load.
    """
    env = {"FLYWHEEL_SCENARIO": "mixed", "FLYWHEEL_SEED": str(seed),
           "FLYWHEEL_CORRECTION_P": str(plan.correction_p), "FLYWHEEL_DRIFT_START": str(plan.drift_start),
           "FLYWHEEL_DRIFT_END": str(plan.drift_end), "FLYWHEEL_DRIFT_RAMP_S": str(plan.drift_ramp_s),
           "FLYWHEEL_MAX_TOKENS": str(plan.max_tokens), "FLYWHEEL_API_KEYS": ",".join(keys)}
    started = time.monotonic()
    current, swaps, last_swap = champion(), 0, 0.0
    with start_locust(url, out_dir, env, users=plan.users, spawn_rate=plan.spawn_rate,
                      seconds=plan.max_duration_s + plan.retrain_grace_s) as locust:
        while locust.poll() is None:
            time.sleep(1.0)
            if (now := champion()) != current:
                current, swaps, last_swap = now, swaps + 1, time.monotonic()
                log.info("event=demo_swap champion=%s swaps=%d", now, swaps)
                if swaps >= plan.loops:
                    on_loops_done()
            elapsed = time.monotonic() - started
            looped = swaps >= plan.loops and time.monotonic() - last_swap >= plan.post_swap_s
            if looped or (elapsed >= plan.max_duration_s and swaps < plan.loops and not retraining()):
                break
    return time.monotonic() - started


@contextmanager
def start_locust(url: str, out_dir: Path, scenario_env: dict[str, str], *, users: int, spawn_rate: float,
                 seconds: float) -> Iterator[subprocess.Popen[bytes]]:
    """Locust, headless, on the locustfile with `scenario_env`; stopped (stats written) when the block ends.

    Every request is logged to `out_dir/requests.jsonl`; Locust's CSV/HTML go to `out_dir/locust*`.
    """
    env = {**os.environ, **scenario_env, "FLYWHEEL_DEMO_LOG": str(out_dir / "requests.jsonl"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
               "-r", str(spawn_rate), "-t", f"{int(seconds)}s", "--host", url,
               "--csv", str(out_dir / "locust"), "--html", str(out_dir / "locust.html"), "--only-summary",
               "--stop-timeout", "30", "--loglevel", "WARNING"]
    with (out_dir / "locust.log").open("wb") as output:
        locust = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            yield locust
            if locust.poll() is None:
                locust.send_signal(signal.SIGTERM)  # Locust stops its users and writes its stats
            locust.wait(timeout=120)
        finally:
            if locust.poll() is None:
                locust.kill()


def locust_failures(out_dir: Path) -> int:
    """Failed requests as Locust counted them, plus exceptions raised in tasks."""
    with (out_dir / "locust_stats.csv").open() as f:
        aggregated = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    exceptions = out_dir / "locust_exceptions.csv"
    raised = sum(int(row["Count"]) for row in csv.DictReader(exceptions.open())) if exceptions.exists() else 0
    return int(aggregated["Failure Count"]) + raised


def _version_stats(predictions: list[dict[str, Any]], ratings: list[dict[str, Any]]) -> dict[str, VersionStats]:
    stats = {}
    for version in sorted({r["adapter_version"] for r in predictions}):
        rows = [r for r in predictions if r["adapter_version"] == version]
        latencies = [r["latency_ms"] for r in rows]
        stats[version] = VersionStats(
            requests=len(rows), accuracy_original=_accuracy(rows, "original"),
            accuracy_drifted=_accuracy(rows, "drifted"),
            mean_rating=_mean([r["rating"] for r in ratings if r["adapter_version"] == version]),
            p50_ms=percentile(latencies, 0.5), p99_ms=percentile(latencies, 0.99))
    return stats


def _windows(rows: list[dict[str, Any]], t0: float, width: float) -> list[Window]:
    windows: list[Window] = []
    if not rows:
        return windows
    for index in range(int((max(r["t"] for r in rows) - t0) // width) + 1):
        inside = [r for r in rows if t0 + index * width <= r["t"] < t0 + (index + 1) * width]
        answered = [r for r in inside if r["kind"] == "predict" and r["status"] == 200]
        versions: dict[str, int] = {}
        for r in answered:
            versions[r["adapter_version"]] = versions.get(r["adapter_version"], 0) + 1
        latencies = [r["latency_ms"] for r in answered]
        rated = [r for r in inside if r["kind"] == "feedback" and r["status"] == 202]
        by_version = {v: _mean([r["rating"] for r in rated if r["adapter_version"] == v])
                      for v in {r["adapter_version"] for r in rated}}
        windows.append(Window(
            start_s=index * width, requests=len(inside),
            failures=sum(r["status"] not in (200, 202) for r in inside),
            drift_share=_mean([float(r["distribution"] == "drifted") for r in answered]),
            accuracy_original=_accuracy(answered, "original"), accuracy_drifted=_accuracy(answered, "drifted"),
            mean_rating=_mean([r["rating"] for r in inside if r["kind"] == "feedback"]),
            p50_ms=percentile(latencies, 0.5), p99_ms=percentile(latencies, 0.99), versions=versions,
            rating_by_version={v: m for v, m in by_version.items() if m is not None}))
    return windows


def plot(report: DemoReport, path: Path) -> None:
    """Accuracy on original vs drifted prompts per window, each version's live mean rating (a canary's two
    arms), latency; swaps and canary moves marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = [w.start_s + report.plan.window_s / 2 for w in report.windows]
    fig, (acc, arms, lat) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for name, values in (("original", [w.accuracy_original for w in report.windows]),
                         ("drifted", [w.accuracy_drifted for w in report.windows])):
        acc.plot(centers, [float("nan") if v is None else v for v in values], marker="o", label=name)
    for version in sorted({v for w in report.windows for v in w.rating_by_version}):
        arms.plot(centers, [w.rating_by_version.get(version, float("nan")) for w in report.windows], marker=".",
                  label=version)
    for move in report.canary:
        arms.axvline(move.at_s, color={"promote": "green", "end": "grey"}.get(move.action, "orange"), linestyle=":")
        arms.text(move.at_s, 5.1, f" {move.action} {move.version} {move.share:.0%}", fontsize=7)
    lat.plot(centers, [float("nan") if w.p50_ms is None else w.p50_ms for w in report.windows], label="p50")
    lat.plot(centers, [float("nan") if w.p99_ms is None else w.p99_ms for w in report.windows], label="p99")
    for axis in (acc, arms, lat):
        for swap in report.swaps:
            axis.axvline(swap.at_s, color="red", linestyle="--")
    if report.swaps:
        acc.text(report.swaps[0].at_s, 1.02, f" swap → {report.swaps[0].to}", color="red", fontsize=8)
    acc.set(ylabel="live accuracy", ylim=(0, 1.1), title=f"flywheel demo (seed {report.seed})")
    arms.set(ylabel="mean rating", ylim=(1, 5.5))
    lat.set(ylabel="/predict latency (ms)", xlabel="seconds since the load started")
    acc.legend(loc="lower right")
    if report.canary:
        arms.legend(loc="lower right", fontsize=7)
    lat.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_report(settings: Settings, *, out_dir: Path, seed: int, quick: bool, url: str, plan: DemoPlan,
                 t0: float, load_s: float, champion_before: str | None) -> DemoReport:
    """The report from the request log, Locust's stats, the registry's history and the run records."""
    rows = [json.loads(line) for line in (out_dir / "requests.jsonl").read_text().splitlines() if line]
    predictions = [r for r in rows if r["kind"] == "predict" and r["status"] == 200]
    ratings = [r for r in rows if r["kind"] == "feedback" and r["status"] == 202]
    registry = registry_for(settings)
    swaps = [Swap(at=e.at, at_s=e.at.timestamp() - t0, from_=e.previous, to=e.version, action=e.action)
             for e in registry.history("champion") if e.at.timestamp() >= t0]
    runs = [r for r in RunStore.for_settings(settings).list() if r.started_at.timestamp() >= t0]
    canary = [CanaryMove(at_s=e.at.timestamp() - t0, version=e.version, share=e.traffic_fraction or 0.0,
                         action=e.action, reason=e.reason)
              for e in registry.history(CANARY_ALIAS) if e.at.timestamp() >= t0]

    busy = [(s.at_s + t0, s.at_s + t0 + SWAP_WINDOW_S) for s in swaps]
    during_swap = [r["latency_ms"] for r in predictions if any(a <= r["t"] <= b for a, b in busy)]
    busy += [(r.started_at.timestamp(), (r.finished_at.timestamp() if r.finished_at else time.time())) for r in runs]
    steady = [r["latency_ms"] for r in predictions if not any(a <= r["t"] <= b for a, b in busy)]
    steady_p99, swap_p99 = percentile(steady, 0.99), percentile(during_swap, 0.99)
    judging = [(r.stages["evaluate"].timestamp(), r.stages["gate"].timestamp()) for r in runs
               if "evaluate" in r.stages and "gate" in r.stages]
    during_gate = [r["latency_ms"] for r in predictions if any(a <= r["t"] <= b for a, b in judging)]
    gate_p99 = percentile(during_gate, 0.99)
    evaluation_s = judging[0][1] - judging[0][0] if judging else None

    loop_s = None
    if swaps and ratings:
        served_new = [r["t"] for r in predictions if r["adapter_version"] == swaps[0].to]
        loop_s = min(served_new) - ratings[0]["t"] if served_new else None
    return DemoReport(
        seed=seed, quick=quick, url=url, plan=plan, load_s=load_s, champion_before=champion_before,
        champion_after=registry.alias("champion"), swaps=swaps, canary=canary,
        runs=[RunSummary(run_id=r.run_id, trigger=r.trigger, verdict=r.verdict, version=r.version,
                         seconds=(r.finished_at - r.started_at).total_seconds() if r.finished_at else None,
                         message=r.message) for r in runs],
        requests=len(rows), failed_requests=locust_failures(out_dir), loop_s=loop_s,
        steady_p99_ms=steady_p99, swap_p99_ms=swap_p99,
        swap_p99_over_steady_p99=swap_p99 / steady_p99 if swap_p99 and steady_p99 else None,
        evaluation_s=evaluation_s, evaluation_share_of_loop=evaluation_s / loop_s if evaluation_s and loop_s else None,
        evaluation_p99_ms=gate_p99, evaluation_p99_over_steady_p99=gate_p99 / steady_p99 if gate_p99 and steady_p99
        else None,
        versions=_version_stats(predictions, ratings), windows=_windows(rows, t0, plan.window_s))


def run_demo(settings: Settings, *, out_dir: Path, quick: bool, url: str | None = None, seed: int = 0,
             plan: DemoPlan | None = None, app_name: str = "flywheel", route_prefix: str = "/") -> DemoReport:
    """Run the demo and write `out_dir/report.json` and `learning_curve.png`; print a summary.

    With `url`, drive that running platform (its own curator and scheduler retrain); otherwise start
    one on `settings` as Serve app `app_name` at `route_prefix`, with a scheduler tuned by `plan`, and
    stop everything it started at the end.
    """
    plan = plan or (DemoPlan.quick() if quick else DemoPlan.full())
    settings = settings.model_copy(deep=True)
    settings.retrain.schedule_interval_s = plan.schedule_interval_s
    settings.retrain.schedule_min_new_examples = plan.schedule_min_new_examples
    settings.serving.app_name = app_name
    # The simulated raters know the ground truth and each person rarely meets a prompt twice: in the demo one
    # authenticated rater's correction is enough (the default asks that raters agree: README, "Who the loop
    # listens to").
    settings.retrain.min_trust = "single"
    if url is None:  # a platform started here: its task's rollout and canary follow the plan
        spec = resolve_task(settings)
        settings.tasks = [*(t for t in settings.tasks if t.name != spec.name),
                          spec.model_copy(update={"rollout": plan.rollout})]
        settings.canary = settings.canary.model_copy(update={
            "steps": [plan.canary_share], "min_ratings": plan.canary_min_ratings,
            "check_every_s": plan.check_every_s})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "requests.jsonl").unlink(missing_ok=True)
    registry = registry_for(settings)

    with ExitStack() as stack:
        stop_scheduler = threading.Event()
        if url is None:
            url, stop_scheduler = stack.enter_context(platform(settings, plan, route_prefix))
        champion_before = registry.alias("champion")
        t0 = time.time()
        runs = RunStore.for_settings(settings)

        def deciding() -> bool:  # a retrain running, or a canary still on trial: the load waits for them
            canary = registry.aliases().get(CANARY_ALIAS)
            return runs.busy() or bool(canary and canary.traffic_fraction)

        # one key per simulated user: a backend that vouches for the people it speaks for
        store = KeyStore(settings.registry_uri, settings.registry.storage_options)
        run = uuid.uuid4().hex[:6]
        made = [store.create(f"demo-rater-{run}-{i}", ["predict", "feedback", "act-for-users"])
                for i in range(plan.users)]
        stack.callback(lambda: [store.revoke(record.name) for record, _ in made])
        load_s = _drive(url, plan, seed, out_dir, lambda: registry.alias("champion"), deciding, stop_scheduler.set,
                        [key for _, key in made])
    report = build_report(settings, out_dir=out_dir, seed=seed, quick=quick, url=url, plan=plan, t0=t0,
                          load_s=load_s, champion_before=champion_before)
    (out_dir / "report.json").write_text(report.model_dump_json(indent=2, by_alias=True))
    plot(report, out_dir / "learning_curve.png")
    print(report.summary())
    return report
