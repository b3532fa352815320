"""Task affinity at the ingress: several fused replicas behind HAProxy, which asks a TaskRouter for each request's
replica (services/task_router.py). A task's requests reach the replica that holds its LoRA, with no gateway hop."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.config import Settings
from flywheel.registry import registry_for
from tests.conftest import make_settings

pytestmark = [pytest.mark.serve]

APP = "affinity"


@pytest.fixture(scope="module")
def affinity_app(served: tuple[str, Settings], demo_home: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[str, list[str]]]:
    from ray import serve

    from loadtests.bench_openai import add_tasks
    from services import app as serve_app

    home = tmp_path_factory.mktemp("affinity-home")
    shutil.copytree(demo_home, home, dirs_exist_ok=True)
    settings = make_settings(home, engine="hf", port=served[1].serving.port, app_name=APP, replicas=2,
                             replica_cpus=0.5)
    assert settings.serving.fused, "several replicas behind HAProxy are their own ingress by default"
    tasks = add_tasks(settings, [registry_for(settings).local_path("demo-v1")], 2, prefix="aff")
    url = serve_app.run(settings, route_prefix=f"/{APP}", timeout_s=600)
    try:
        yield url, tasks
    finally:
        serve.delete(APP)


async def replica_answering(client: httpx.AsyncClient, url: str, task: str) -> str:
    response = await client.post(f"{url}/v1/chat/completions", json={
        "model": task, "messages": [{"role": "user", "content": "Acme shares surged"}], "max_tokens": 8})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == f"{task}-v1"
    return response.headers["x-flywheel-replica"]


async def replicas_answering(url: str, tasks: list[str], rounds: int, at_once: int) -> dict[str, set[str]]:
    """Which replicas answered each task, asked `at_once` requests per task together, `rounds` times."""
    served_by: dict[str, set[str]] = {task: set() for task in tasks}
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(rounds):
            asked = [task for task in tasks for _ in range(at_once)]
            for task, replica in zip(asked, await asyncio.gather(*(replica_answering(client, url, t) for t in asked)),
                                     strict=True):
                served_by[task].add(replica)
    return served_by


def test_each_tasks_requests_reach_the_replica_that_answered_it_before(affinity_app: tuple[str, list[str]]) -> None:
    url, tasks = affinity_app
    deadline = time.monotonic() + 60
    while len(httpx.get(f"{url}/healthz", timeout=10).json()["replicas"]) < 2 and time.monotonic() < deadline:
        time.sleep(1)  # each replica reports itself once it is up
    assert len(httpx.get(f"{url}/healthz", timeout=10).json()["replicas"]) == 2
    for task in tasks:  # each task's first answer tells Serve, and through it the router, where its LoRA is
        asyncio.run(replicas_answering(url, [task], rounds=1, at_once=1))
        time.sleep(2)
    # Several at once: HAProxy on load alone (least connections) would spread each task over both replicas.
    served_by = asyncio.run(replicas_answering(url, tasks, rounds=3, at_once=4))
    assert all(len(answered) == 1 for answered in served_by.values()), served_by


def test_requests_the_router_cannot_place_still_reach_a_replica(affinity_app: tuple[str, list[str]]) -> None:
    url, _ = affinity_app
    unplaceable = httpx.post(f"{url}/v1/chat/completions", timeout=60, content=b'{"model": "sentim',
                             headers={"content-type": "application/json"})
    assert unplaceable.status_code in (400, 422), unplaceable.text  # the replica's own answer, not HAProxy's 503
    no_task = httpx.post(f"{url}/predict", timeout=60, json={"prompt": "Acme shares surged", "max_tokens": 4})
    assert no_task.status_code == 200 and no_task.json()["adapter_version"] == "demo-v1", no_task.text
