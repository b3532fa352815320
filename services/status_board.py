"""A small Ray actor where every LLM replica posts its adapter status, so the gateway sees them all.

Ray Serve routes a call to one replica; /healthz and /metrics need every replica's view, and the
swap benchmark needs to know when the last replica flipped.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import ray

BOARD_NAME = "flywheel-replica-board"
STALE_AFTER_S = 10.0
FORGET_AFTER_S = 300.0  # a replica silent this long is gone (scaled down, crashed): its entry goes too


@ray.remote(num_cpus=0)
class ReplicaBoard:
    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, status: dict[str, Any]) -> None:
        now = time.time()
        self._replicas[replica] = {**status, "replica": replica, "reported_at": now}
        for gone in [r for r, s in self._replicas.items() if s["reported_at"] < now - FORGET_AFTER_S]:
            del self._replicas[gone]

    def forget(self, replica: str) -> None:
        self._replicas.pop(replica, None)

    def snapshot(self) -> list[dict[str, Any]]:
        """Replicas that reported recently (a dead replica drops out by going quiet)."""
        cutoff = time.time() - STALE_AFTER_S
        return [s for s in self._replicas.values() if s["reported_at"] >= cutoff]


def get_board(registry_uri: str, alias: str) -> Any:
    """The board of the app serving `alias` from `registry_uri` (two apps on one cluster stay apart)."""
    key = hashlib.sha256(f"{registry_uri}#{alias}".encode()).hexdigest()[:12]
    return ReplicaBoard.options(  # type: ignore[attr-defined]
        name=f"{BOARD_NAME}-{key}", namespace="flywheel", get_if_exists=True, lifetime="detached"
    ).remote()


def version_figures(replicas: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Users' requests per version over all replicas: requests and failures summed, the worst replica's p99."""
    totals: dict[str, dict[str, float]] = {}
    for replica in replicas:
        for version, tally in replica.get("versions", {}).items():
            total = totals.setdefault(version, {"requests": 0, "failures": 0, "p99_ms": 0.0})
            total["requests"] += tally["requests"]
            total["failures"] += tally["failures"]
            total["p99_ms"] = max(total["p99_ms"], tally["p99_ms"])
    return totals
