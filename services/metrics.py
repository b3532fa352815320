"""Prometheus metrics of the gateway: requests, latency, tokens, and each replica's adapter state."""

from __future__ import annotations

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
        for status in self._snapshot():
            replica = status["replica"]
            if held := status.get("pinned"):
                for name, family in pinned.items():
                    family.add_metric([replica], held[name])
                for version in held["resident"]:
                    resident.add_metric([replica, version], 1)
            for task, state in status.get("tasks", {}).items():
                active.add_metric([replica, task, state["active"]], 1)
                swaps.add_metric([replica, task, "succeeded"], state["swaps_succeeded"])
                swaps.add_metric([replica, task, "failed"], state["swaps_failed"])
                if state["last_failure"]:
                    failed.add_metric([replica, task, state["last_failure"]["version"]], 1)
        champion = GaugeMetricFamily(
            "flywheel_champion_info", "The version the default task's champion alias points at", labels=["version"]
        )
        champion.add_metric([self._champion() or "none"], 1)
        yield from (active, swaps, failed, champion, *pinned.values(), resident)


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

    def watch_replicas(self, collector: ReplicaCollector) -> None:
        self.registry.register(collector)  # type: ignore[arg-type]
