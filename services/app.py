"""Assemble the Serve application and run it on a local or existing Ray cluster.

`serve run services.app:app_builder` and `deploy/serve.yaml` use `app_builder`; `flywheel up` and
the tests use `run`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from ray.serve import Application
from ray.serve._private import build_app as serve_builder

from flywheel.config import Settings, load_settings
from services.fused import FusedServer
from services.gateway import Gateway
from services.llm_server import LLMServer
from services.loop import LoopKeeper
from services.task_router import ROUTE_BODY_BYTES, TaskRouter

log = logging.getLogger("flywheel.app")

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # Ray Serve's HAProxy mode (`serving.ingress: haproxy`)
HAPROXY_SIDE_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
# HAProxy hands the TaskRouter each request's body (the task is in it), up to this many bytes
TASK_ROUTER_ENV = {"RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
                   "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE": str(ROUTE_BODY_BYTES)}


def _replica_env(settings: Settings) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm.cpu_kvcache_gib),
        "TOKENIZERS_PARALLELISM": "false",
    }


# Our gateway logs one `event=predict` line per request with the adapter version; Serve's access log
# would repeat every request twice more (proxy and replica).
QUIET = {"enable_access_log": False}


def build_app(settings: Settings) -> Application:
    # Secrets reach replicas only through their process environment, never init args or a runtime env (the
    # dashboard and the state API show both): a Ray flywheel starts inherits them (`ensure_ray`); on a
    # cluster every pod has them from its Kubernetes Secret.
    payload = settings.shareable()
    unseen = [name for name, value in settings.secret_env().items() if os.environ.get(name) != value]
    if unseen:
        log.warning("event=secrets_not_in_environment names=%s message='set in the config file but not in this "
                    "environment: the replicas read secrets from theirs (on Kubernetes, a Secret in the pod "
                    "spec)'", ",".join(unseen))
    # The loop (curator, scheduler, canary controller) is part of the app, so `serve deploy` runs it too.
    loop = LoopKeeper.options(logging_config=QUIET, ray_actor_options={"num_cpus": 0}).bind(
        payload) if settings.loop.enabled else None
    engine_replicas = {**replica_count(settings), "logging_config": QUIET}
    engine_resources = {"num_cpus": settings.serving.replica_cpus, "num_gpus": settings.serving.replica_gpus,
                        "runtime_env": {"env_vars": _replica_env(settings)}}
    if settings.serving.fused:
        fused = FusedServer.options(**engine_replicas, ray_actor_options=engine_resources).bind(payload, loop)
        return _with_task_router(fused, settings)
    llm = LLMServer.options(**engine_replicas, ray_actor_options=engine_resources).bind(payload)
    return Gateway.options(logging_config=QUIET, ray_actor_options={"num_cpus": 0}).bind(llm, payload, loop)


def _with_task_router(fused: Application, settings: Settings) -> Application:
    """Several fused replicas behind HAProxy: HAProxy asks a TaskRouter which replica answers each request, so a
    task's requests reach the replicas holding its LoRA with no gateway hop (`services.task_router`). One replica
    needs no choice; Serve's own proxy cannot ask one (it spreads requests by load alone)."""
    several = settings.serving.autoscaling is not None or settings.serving.replicas > 1
    if not (several and serve_builder.RAY_SERVE_ENABLE_HA_PROXY):
        return fused
    # Ray Serve's ingress request router, as Ray Serve LLM's direct ingress attaches its own (an internal hook in
    # Ray 2.60, pinned by constraints.txt)
    return fused._with_ingress_request_router(TaskRouter.options(logging_config=QUIET).bind(
        fused, settings.default_task))


def replica_count(settings: Settings) -> dict[str, Any]:
    """The LLM deployment's replicas: a fixed number, or Serve's autoscaling between `serving.autoscaling`'s
    bounds (Serve takes `num_replicas="auto"` beside an autoscaling config, never a number)."""
    scaling = settings.serving.autoscaling
    if scaling is None:
        return {"num_replicas": settings.serving.replicas}
    return {"num_replicas": "auto", "autoscaling_config": {**scaling.model_dump(),
                                                           "initial_replicas": scaling.min_replicas}}


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy`: args may name a `config` YAML file."""
    config = args.get("config")
    return build_app(load_settings(Path(config) if config else None))


def ensure_ray(settings: Settings) -> None:
    if ray.is_initialized():
        return
    # Logical CPUs: enough for the LLM replicas AND a retrain's workers, so training never waits on
    # serving (the OS shares the real cores; Ray only counts reservations).
    replicas = settings.serving.autoscaling.max_replicas if settings.serving.autoscaling else settings.serving.replicas
    wanted = replicas * settings.serving.replica_cpus + (
        settings.retrain.num_workers * settings.retrain.cpus_per_worker + 1)
    local = {} if settings.ray.address else {  # an existing cluster was started with its own
        "num_cpus": settings.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(wanted)),
        "object_store_memory": settings.ray.object_store_mb * 1024 * 1024,
        "include_dashboard": settings.ray.dashboard_port is not None,
        "dashboard_port": settings.ray.dashboard_port,
    }
    if settings.ray.address:
        log.info("event=ingress_from_cluster message='the cluster's own environment decides between HAProxy and "
                 "Serve's proxy (RAY_SERVE_ENABLE_HA_PROXY)'")
    elif settings.serving.ingress == "haproxy":
        os.environ[HAPROXY_ENV] = "1"  # read by Serve's controller and replicas in the Ray started below
        serve_builder.RAY_SERVE_ENABLE_HA_PROXY = True  # and by Serve's app builder here, which read it at import
        for variable, value in TASK_ROUTER_ENV.items():
            os.environ.setdefault(variable, value)
        # A gateway replica that stops keeps answering this long, for load balancers to drop it (Ray's default
        # is 30 s). Here HAProxy is on the same node and hears of it at once, so a stop need not wait 30 s.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
        _haproxy_side_ports()
    else:
        os.environ[HAPROXY_ENV] = "0"  # the setting decides for a Ray flywheel starts, not an inherited variable
        serve_builder.RAY_SERVE_ENABLE_HA_PROXY = False
    if not settings.ray.address:  # the Ray started here passes this environment to every worker it starts
        os.environ.update(settings.secret_env())
    ray.init(address=settings.ray.address, log_to_driver=True, namespace="flywheel", **local)


def _haproxy_side_ports() -> None:
    """HAProxy also listens for its stats and Prometheus pages, on fixed ports (Ray's defaults: 8404, 9101, or the
    variables' values). One taken (say, by another flywheel's HAProxy on this box, whose choice this process may
    have inherited) would stop HAProxy from starting: take a free one."""
    for variable, default in HAPROXY_SIDE_PORTS.items():
        wanted = os.environ.get(variable, str(default))
        if not (wanted.isdigit() and _bindable(int(wanted))):
            os.environ[variable] = str(free_port("0.0.0.0"))
            log.info("event=haproxy_port_moved variable=%s from=%s to=%s", variable, wanted, os.environ[variable])


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing on `host` listens on now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def run(settings: Settings, *, timeout_s: float = 300.0, route_prefix: str = "/") -> str:
    """Start (or reuse) Ray and Serve, deploy the app as `serving.app_name`, and return its URL once /healthz
    answers.

    Several apps (e.g. two registries) can share one Serve instance under different names and route prefixes.
    """
    ensure_ray(settings)
    serve.start(http_options={"host": settings.serving.host, "port": settings.serving.port})
    serve.run(build_app(settings), name=settings.serving.app_name, route_prefix=route_prefix, blocking=False)
    url = f"http://{settings.serving.host}:{settings.serving.port}{route_prefix.rstrip('/')}"
    wait_healthy(url, timeout_s=timeout_s)
    return url


def wait_healthy(url: str, *, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200 and response.json()["replicas"]:
                return response.json()
            last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last_error = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f}s (last: {last_error})")


def shutdown() -> None:
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
