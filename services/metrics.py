"""Prometheus metrics of the gateway: requests, latency, tokens, ratings per version, each replica's
adapter state, and what ops watch besides: the curator's lag, the spool, retrain outcomes and the gate."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ReplicaCollector:
    """Reads the status board at scrape time, so the numbers are every replica's, not one's."""

    def __init__(self, snapshot: Callable[[], list[dict[str, Any]]], champion: Callable[[], str | None]):
        self._snapshot = snapshot
        self._champion = champion

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "flywheel_adapter_active", "1 for the adapter version each replica serves for each task",
            labels=["replica", "task", "version"],
        )
        swaps = CounterMetricFamily(
            "flywheel_adapter_swaps", "Adapter swaps per replica and task by result",
            labels=["replica", "task", "result"],
        )
        failed = GaugeMetricFamily(
            "flywheel_adapter_swap_failed", "1 while a replica's last swap attempt for a task failed",
            labels=["replica", "task", "version"],
        )
        pinned = {
            "loads": CounterMetricFamily("flywheel_pinned_adapter_loads", "Pinned versions loaded on demand",
                                         labels=["replica"]),
            "evictions": CounterMetricFamily("flywheel_pinned_adapter_evictions",
                                             "Pinned versions unloaded to stay within serving.max_pinned_adapters",
                                             labels=["replica"]),
            "load_seconds": CounterMetricFamily("flywheel_pinned_adapter_load_seconds",
                                                "Time spent loading pinned versions", labels=["replica"]),
        }
        resident = GaugeMetricFamily("flywheel_pinned_adapter_resident", "1 for each pinned version a replica holds",
                                     labels=["replica", "version"])
        loras = {
            "loads": CounterMetricFamily("flywheel_lora_loads", "LoRAs loaded into each replica's engine, per version "
                                         "(again after an eviction)", labels=["replica", "version"]),
            "evictions": CounterMetricFamily("flywheel_lora_evictions", "LoRAs removed to make room for other tasks' "
                                             "(vllm.max_cpu_loras), per version", labels=["replica", "version"]),
            "load_seconds": CounterMetricFamily("flywheel_lora_load_seconds", "Time spent loading each version's LoRA",
                                                labels=["replica", "version"]),
        }
        lora_resident = GaugeMetricFamily("flywheel_lora_resident", "1 for each LoRA in a replica's engine",
                                          labels=["replica", "version"])
        ongoing = GaugeMetricFamily("flywheel_replica_ongoing_requests", "Requests in each LLM replica now",
                                    labels=["replica"])
        canary = GaugeMetricFamily("flywheel_canary_share", "Share of users each replica sends to a task's canary",
                                   labels=["replica", "task", "version"])
        for status in self._snapshot():
            replica = status["replica"]
            ongoing.add_metric([replica], status.get("ongoing", 0))
            if held := status.get("pinned"):
                for name, family in pinned.items():
                    family.add_metric([replica], held[name])
                for version in held["resident"]:
                    resident.add_metric([replica, version], 1)
            if engine := status.get("loras"):
                for name, family in loras.items():
                    for version, value in engine[name].items():
                        family.add_metric([replica, version], value)
                for version in engine["resident"]:
                    lora_resident.add_metric([replica, version], 1)
            for task, state in status.get("tasks", {}).items():
                active.add_metric([replica, task, state["active"]], 1)
                swaps.add_metric([replica, task, "succeeded"], state["swaps_succeeded"])
                swaps.add_metric([replica, task, "failed"], state["swaps_failed"])
                if state["last_failure"]:
                    failed.add_metric([replica, task, state["last_failure"]["version"]], 1)
                if trial := state.get("canary"):
                    canary.add_metric([replica, task, trial["version"]], trial["share"])
        champion = GaugeMetricFamily(
            "flywheel_champion_info", "The version the default task's champion alias points at", labels=["version"]
        )
        champion.add_metric([self._champion() or "none"], 1)
        yield from (active, swaps, failed, champion, *pinned.values(), resident, *loras.values(), lora_resident,
                    ongoing, canary)


class RecentAnswers:
    """Which task and version answered each recent request, and for whom, so a rating can be counted against
    them and refused from anyone but the asker.

    Bounded (the oldest are forgotten); a rating for a request this gateway replica did not answer,
    or answered long ago, counts under version `unknown`.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._answers: OrderedDict[str, tuple[str, str, str | None]] = OrderedDict()

    def remember(self, request_id: str, task: str, version: str, asker: str | None) -> None:
        self._answers[request_id] = (task, version, asker)
        if len(self._answers) > self.capacity:
            self._answers.popitem(last=False)

    def who(self, request_id: str) -> tuple[str, str]:
        """The task and version that answered."""
        task, version, _ = self._answers.get(request_id, ("unknown", "unknown", None))
        return task, version

    def asker(self, request_id: str) -> str | None:
        """Who asked (None: not answered here lately: the curator checks instead)."""
        return self._answers.get(request_id, (None, None, None))[2]


class OpsCollector:
    """Read at scrape time: the gateway's spool, the curator's health and lag, retrain runs and the gate."""

    def __init__(self, bus_stats: Callable[[], dict[str, Any]], curator: Callable[[], Any],
                 runs: Callable[[], dict[str, Any]]) -> None:
        self._bus_stats, self._curator, self._runs = bus_stats, curator, runs

    def collect(self) -> Iterator[Metric]:
        stats = self._bus_stats()
        yield _gauge("flywheel_spool_pending_events", "Events in this gateway's spool waiting for the broker",
                     stats.get("pending", 0))
        yield _gauge("flywheel_spool_oldest_age_seconds", "Age of the oldest event waiting in the spool",
                     stats.get("oldest_pending_age_s") or 0.0)
        health = self._curator()
        yield _gauge("flywheel_curator_up", "1 while the curator runs; 0 while it waits for the broker or is stopped",
                     1.0 if health is not None and health.state == "running" else 0.0)
        yield _gauge("flywheel_curator_lag_records", "Records logged but not yet curated",
                     health.lag_records if health is not None else 0)
        yield _gauge("flywheel_curator_lag_seconds", "Age of the oldest record not yet curated",
                     health.lag_seconds if health is not None else 0.0)
        runs = self._runs()
        outcomes = CounterMetricFamily("flywheel_retrain_runs", "Finished retrain runs by task and verdict",
                                       labels=["task", "verdict"])
        for (task, verdict), count in runs["outcomes"].items():
            outcomes.add_metric([task, verdict], count)
        in_a_row = GaugeMetricFamily("flywheel_gate_rejections_in_a_row", "Latest retrains the gate rejected, "
                                     "counted back from the newest", labels=["task"])
        for task, count in runs["rejections_in_a_row"].items():
            in_a_row.add_metric([task], count)
        gate = GaugeMetricFamily("flywheel_gate_metric", "The last gated run's scores by arm and slice",
                                 labels=["task", "arm", "slice"])
        for (task, arm, slice_name), score in runs["gate"].items():
            gate.add_metric([task, arm, slice_name], score)
        yield from (outcomes, in_a_row, gate)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "flywheel_requests", "HTTP requests by route and status", ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flywheel_request_latency_seconds", "End-to-end latency of successful requests",
            ["route", "adapter_version"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter(
            "flywheel_tokens", "Tokens processed by kind", ["kind", "adapter_version"], registry=self.registry
        )

        self.events = Counter(
            "flywheel_bus_events", "Events handed to the feedback bus by type and result", ["type", "result"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            "flywheel_time_to_first_token_seconds", "Time to the first tokens of streamed answers",
            ["route", "adapter_version"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.ratings = Counter(
            "flywheel_ratings", "Feedback by the task and version that answered, and kind (rating, thumb_up, "
            "thumb_down, correction)", ["task", "version", "kind"], registry=self.registry,
        )
        self.rating_values = Counter(
            "flywheel_rating_value_sum", "Sum of 1..5 ratings by task and version (mean: divide by "
            "flywheel_ratings_total{kind=\"rating\"})", ["task", "version"], registry=self.registry,
        )

    def watch(self, collector: ReplicaCollector | OpsCollector) -> None:
        self.registry.register(collector)  # type: ignore[arg-type]

    def count_feedback(self, task: str, version: str, rating: int | None, thumb: str | None,
                       correction: str | None) -> None:
        if rating is not None:
            self.ratings.labels(task, version, "rating").inc()
            self.rating_values.labels(task, version).inc(rating)
        if thumb is not None:
            self.ratings.labels(task, version, f"thumb_{thumb}").inc()
        if correction is not None:
            self.ratings.labels(task, version, "correction").inc()
