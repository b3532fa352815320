"""The loop's keeper: a deployment of the app that runs the curator, the retrain scheduler and the canary
controller, so every way of starting the app (`flywheel up`, `serve deploy`, a RayService) runs the whole loop.

Several apps may share one registry (an upgrade that runs two RayServices for a while, two app names on one
cluster): their keepers elect one through a lease in the registry's own store (flywheel.lease), the one thing
they all share whatever Ray cluster they run in. The others stand by, and one takes over when the leader stops
renewing. The lease's epoch fences the leader's alias moves, so a keeper paused past its lease cannot move
an alias once another leads. So one curator reads the consumer group, one scheduler starts retrains, and one
controller moves canaries.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray import serve

from flywheel.canary import CanaryController
from flywheel.config import Settings
from flywheel.lease import StoreLease
from flywheel.logs import configure_logging
from flywheel.registry import registry_for
from services.protocol import LoopHealth
from services.status_board import get_board, version_figures

log = logging.getLogger("flywheel.loop")


def canary_controller(settings: Settings, stop: threading.Event, fence: int | None = None) -> CanaryController:
    """The canary controller of this app: ratings from the curated dataset, guardrails from the replicas;
    `fence`: the loop lease's epoch its moves are made under."""
    from feedback.dataset import canary_ratings

    board = get_board(settings.registry_uri, settings.serving.alias)

    def figures() -> dict[str, dict[str, float]]:
        try:
            return version_figures(ray.get(board.snapshot.remote(), timeout=10))
        except Exception:  # replicas not reporting: the guardrails wait, the ratings still decide
            log.warning("event=canary_figures_unavailable", exc_info=True)
            return {}

    return CanaryController(settings, stop, ratings=canary_ratings(settings), figures=figures, fence=fence)


def loop_workers(settings: Settings, stop: threading.Event, fence: int) -> list[threading.Thread]:
    """The loop's parts, not yet started: the curator (supervised: it outlives a broker that is down), the
    retrain scheduler if enabled, and the canary controller; the controller's moves and those of the runs the
    scheduler starts carry the lease's epoch `fence`. All end when `stop` is set."""
    from feedback.supervisor import supervise
    from flywheel.scheduler import RetrainScheduler

    workers = [threading.Thread(target=supervise, args=(settings, stop), name="curator", daemon=True)]
    if settings.retrain.schedule_enabled:
        workers.append(RetrainScheduler(settings, stop, fence=fence))
    workers.append(canary_controller(settings, stop, fence))
    return workers


@serve.deployment(num_replicas=1, health_check_period_s=10, graceful_shutdown_timeout_s=60,
                  ray_actor_options={"num_cpus": 0})
class LoopKeeper:
    """Claims the lease every third of `loop.lease_s`; runs the loop's parts while it holds it."""

    def __init__(self, settings: dict[str, Any]) -> None:
        configure_logging()
        self.settings = Settings.from_shared(settings)
        self.name = f"{self.settings.serving.app_name}#{serve.get_replica_context().replica_id.unique_id}"
        self.lease = StoreLease(registry_for(self.settings), self.name, self.settings.loop.lease_s)
        self.stop = threading.Event()
        self.term: tuple[int, threading.Event, list[threading.Thread]] | None = None  # (epoch, stop, parts)
        self.role: str = "starting"
        self.holder: str | None = None
        self.since = time.time()
        self.keeper = threading.Thread(target=self._keep, name="loop-keeper", daemon=True)
        self.keeper.start()

    def _keep(self) -> None:
        lease_s = self.settings.loop.lease_s
        renewed_at = 0.0
        while not self.stop.is_set():
            try:
                epoch = self.lease.claim()
                if epoch is not None:
                    renewed_at = time.monotonic()
                    self._lead(epoch)
                else:
                    self.holder = self.lease.holder_now()
                    self._stand_by()
            except Exception as exc:  # the store is unreachable: the lease cannot be renewed or read
                log.warning("event=loop_lease_unreachable error=%s", type(exc).__name__)
                if self.term and time.monotonic() - renewed_at > lease_s:
                    self._stand_by()  # unrenewed past the lease: another keeper may lead by now
            self.stop.wait(lease_s / 3)
        self._stand_by()
        try:
            self.lease.release()
        except Exception:  # the lease expires by itself
            log.warning("event=loop_lease_release_failed")

    def _lead(self, epoch: int) -> None:
        self.holder = self.name
        if self.term is not None and self.term[0] == epoch:
            return
        self._end_term()  # parts of an older epoch (lost, then taken again) must not go on under it
        stop = threading.Event()
        workers = loop_workers(self.settings, stop, epoch)
        for worker in workers:
            worker.start()
        self.term, self.role, self.since = (epoch, stop, workers), "leading", time.time()
        log.info("event=loop_leading keeper=%s epoch=%d parts=%s", self.name, epoch, ",".join(w.name for w in workers))

    def _end_term(self) -> None:
        if self.term is not None:
            _, stop, workers = self.term
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
            self.term = None
            log.info("event=loop_stopped keeper=%s", self.name)

    def _stand_by(self) -> None:
        self._end_term()
        if self.role != "standby":
            self.role, self.since = "standby", time.time()
            log.info("event=loop_standby keeper=%s leader=%s", self.name, self.holder)

    def status(self) -> dict[str, Any]:
        parts = [w.name for w in self.term[2] if w.is_alive()] if self.term else []
        return LoopHealth(role=self.role, keeper=self.name, leader=self.holder, since=self.since, parts=parts,
                          epoch=self.term[0] if self.term else None).model_dump()

    def check_health(self) -> None:
        """Serve restarts a replica whose keeper or parts died; its successor claims the loop again."""
        if not self.keeper.is_alive():
            raise RuntimeError("the loop keeper's thread ended")
        if self.term and (dead := [w.name for w in self.term[2] if not w.is_alive()]):
            raise RuntimeError(f"loop parts ended: {', '.join(dead)}")

    def __del__(self) -> None:
        self.stop.set()
        self.keeper.join(timeout=50)
