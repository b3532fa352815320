"""The loop is part of the Serve app: started alone (no `flywheel up`), an app curates feedback and retrains on
schedule; two apps on one registry run one curator and one scheduler, and the survivor takes over.

Two apps on the shared Serve instance over one home: `loop-a` (vLLM, deployed first: it leads) and `loop-b`
(two replicas of the transformers engine, to spare the CPUs). Nothing in this file runs a curator or a retrain
by hand.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from feedback.dataset import CuratedDataset
from flywheel.cli import app as cli
from flywheel.config import Settings
from flywheel.registry import registry_for
from flywheel.runs import RunState, RunStore
from tests.conftest import free_port, learn_from_anyone, make_settings
from tests.test_deploy import DEPLOY, GRAFANA_VARIABLE, GRAFANA_VARIABLES, dashboard_queries, tool
from tests.test_retrain import DRIFTED, accuracy, gate_requests, rate, wait_for

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

APPS = ("loop-a", "loop-b")


def loop_settings(home: Path, port: int, app: str, engine: str, replicas: int = 1, topology: str = "fused"
                  ) -> Settings:
    settings = make_settings(home, engine=engine, port=port, app_name=app, replicas=replicas,
                             replica_cpus=1.0 / replicas, topology=topology)
    settings.loop.enabled, settings.loop.lease_s = True, 3.0
    learn_from_anyone(settings)
    settings.retrain.min_examples = 40
    settings.retrain.steps = 80
    settings.retrain.gate.max_latency_ratio = 3.0  # shared 2-core CI boxes: latency is noise, not signal
    settings.retrain.schedule_interval_s = 1.0
    # Every one of the raters' rows, so the retrain's data is the same on every run; and half of it replay, so
    # that one run in a few does not forget enough of the champion's data to fail the golden check (0.3 did).
    settings.retrain.schedule_min_new_examples = len(DRIFTED[5:])
    settings.retrain.replay_fraction = 0.5
    return settings


@pytest.fixture(scope="module")
def two_apps(served: tuple[str, Settings], demo_home: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[dict[str, str], Settings]]:
    from ray import serve

    from services import app as serve_app

    home = tmp_path_factory.mktemp("loop-home")
    shutil.copytree(demo_home, home, dirs_exist_ok=True)
    port = served[1].serving.port
    urls = {}
    # One app of each topology: a fused vLLM replica, and a gateway in front of two HF replicas (Serve's
    # multiplexing routes between them by task).
    for app, engine, replicas, topology in zip(APPS, ("vllm", "hf"), (1, 2), ("fused", "split"), strict=True):
        urls[app] = serve_app.run(loop_settings(home, port, app, engine, replicas, topology), route_prefix=f"/{app}",
                                  timeout_s=600)
    try:
        yield urls, loop_settings(home, port, APPS[0], "vllm")
    finally:
        for app in APPS:
            serve.delete(app)


def loop_health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=10).json()["loop"]


def curated_request_ids(settings: Settings) -> list[str]:
    return CuratedDataset(settings.feedback_dir / "dataset").read_table()["request_id"].to_pylist()


def test_the_app_alone_curates_once_and_retrains_on_schedule(two_apps: tuple[dict[str, str], Settings]) -> None:
    urls, settings = two_apps
    a, b = urls[APPS[0]], urls[APPS[1]]
    assert wait_for(lambda: loop_health(a)["role"] == "leading", timeout_s=30), loop_health(a)
    leader = loop_health(a)
    assert set(leader["parts"]) == {"curator", "retrain-scheduler", "canary-controller"}, leader
    standby = loop_health(b)
    assert standby["role"] == "standby" and standby["leader"] == leader["keeper"] and not standby["parts"], standby
    before, _ = accuracy(a, DRIFTED[:40])

    # Raters use both apps; one curator reads the one log: every row once, none twice.
    half = len(DRIFTED[5:]) // 2
    sent = asyncio.run(rate(a, DRIFTED[5:5 + half], lambda e: e.answer))
    sent += asyncio.run(rate(b, DRIFTED[5 + half:], lambda e: e.answer))
    assert wait_for(lambda: len(curated_request_ids(settings)) >= len(sent), timeout_s=120)
    time.sleep(3 * settings.feedback.curator_flush_s)
    curated = curated_request_ids(settings)
    assert sorted(curated) == sorted(sent), "every rated request curated exactly once"

    # The scheduler in the leading keeper starts the retrain; it is judged on loop-a's replicas and promoted.
    store = RunStore.for_settings(settings)
    scored_before = gate_requests(a)
    assert wait_for(lambda: any(r.state != RunState.RUNNING for r in store.list()), timeout_s=1200), store.list()
    [run] = store.list()
    assert run.trigger == "schedule" and run.state == RunState.PASSED, run
    judged_on = run.report["engine"]
    assert judged_on["engine"] == "serving" and judged_on["app"] == APPS[0], run.report
    assert set(judged_on["replicas"]) <= {r["replica"] for r in httpx.get(f"{a}/healthz").json()["replicas"]}
    assert gate_requests(a) > scored_before, "the serving replicas never scored"
    registry = registry_for(settings)
    assert registry.alias("champion") == run.version
    manifest = registry.manifest(run.version)
    assert manifest.parent == "demo-v1" and manifest.status == "ready"
    assert manifest.data["snapshot_positions"], "lineage: the feedback positions the data covers"
    assert manifest.data["train"] > 0 and manifest.data["holdout"] > 0
    assert manifest.gate and manifest.gate["passed"] is True
    assert {c["name"] for c in manifest.gate["checks"]} >= {"improvement", "significance", "golden_regression",
                                                            "engine_parity"}
    assert manifest.training["last_loss"] < manifest.training["first_loss"]
    for url in (a, b):
        assert wait_for(lambda url=url: httpx.get(f"{url}/healthz").json()["serving"] == [run.version], timeout_s=60)
    after, versions = accuracy(a, DRIFTED[:40])
    assert versions == {run.version} and after >= before + 0.3, (before, after)


@pytest.fixture(scope="module")
def prometheus(two_apps: tuple[dict[str, str], Settings], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:
    """A real Prometheus scraping both apps every second, with the shipped alert rules loaded."""
    binary = tool("prometheus")
    urls, settings = two_apps
    root = tmp_path_factory.mktemp("prometheus")
    jobs = [{"job_name": app, "metrics_path": f"/{app}/metrics", "scrape_interval": "1s",
             "static_configs": [{"targets": [f"127.0.0.1:{settings.serving.port}"]}]} for app in urls]
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"evaluation_interval": "1s"}, "scrape_configs": jobs,
                                      "rule_files": [str(DEPLOY / "prometheus" / "alerts.yaml")]}))
    address = f"127.0.0.1:{free_port()}"
    with (root / "prometheus.log").open("wb") as log:
        server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                                   f"--web.listen-address={address}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: _ready(f"http://{address}"), timeout_s=60), (root / "prometheus.log").read_text()
        yield f"http://{address}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_prometheus_scrapes_the_apps_and_every_dashboard_query_has_data(
        two_apps: tuple[dict[str, str], Settings], prometheus: str) -> None:
    """After a retrain (previous test): every panel of the shipped Grafana board shows data, every alert rule
    evaluates, and both apps are scraped."""
    urls, _ = two_apps
    with httpx.Client(timeout=60) as client:
        for url in urls.values():
            for thumb in ("up", "down"):
                with client.stream("POST", f"{url}/predict", json={"prompt": DRIFTED[0].prompt, "max_tokens": 16,
                                                                    "stream": True}) as streamed:
                    request_id = next(json.loads(line[6:])["request_id"] for line in streamed.iter_lines()
                                      if line.startswith("data: ") and '"done": true' in line)
                assert client.post(f"{url}/feedback", json={"request_id": request_id, "thumb": thumb,
                                                            "rating": 3}).status_code == 202

    def query(expr: str) -> list[dict]:
        answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def concrete(expr: str) -> str:
        return GRAFANA_VARIABLE.sub(lambda m: GRAFANA_VARIABLES[m.group(1)], expr)

    def empty_panels() -> list[str]:
        return [f"{title}: {expr}" for title, expr in dashboard_queries() if not query(concrete(expr))]

    assert wait_for(lambda: not empty_panels(), timeout_s=60), "\n".join(empty_panels())
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert sorted(t["labels"]["job"] for t in targets if t["health"] == "up") == sorted(urls), targets
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules and all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    # both apps report the one run store
    assert query('max(flywheel_retrain_runs_total{verdict="passed"})')[0]["value"][1] == "1"


def test_the_other_app_takes_the_loop_over_when_the_leader_goes(two_apps: tuple[dict[str, str], Settings]) -> None:
    from ray import serve

    urls, settings = two_apps
    b = urls[APPS[1]]
    serve.delete(APPS[0])
    assert wait_for(lambda: loop_health(b)["role"] == "leading", timeout_s=4 * settings.loop.lease_s), loop_health(b)
    assert "curator" in loop_health(b)["parts"]

    seen = len(curated_request_ids(settings))
    sent = asyncio.run(rate(b, DRIFTED[:3], lambda e: e.answer))
    assert wait_for(lambda: len(curated_request_ids(settings)) == seen + len(sent), timeout_s=60), \
        "the new leader's curator picks up where the old one stopped"
    assert len(set(curated_request_ids(settings))) == seen + len(sent)


def test_a_tasks_requests_go_to_the_replica_that_answered_it_lately(two_apps: tuple[dict[str, str], Settings]
                                                                   ) -> None:
    """Serve's multiplexing routes by task: a task new to both replicas sticks to the one that answered it first.
    Locality is Serve's preference, not a promise (a busy replica's requests go elsewhere): without it, 16 or
    more of 20 requests over two idle replicas land on one given replica with odds of about 1 in 170."""
    from loadtests.bench_openai import add_tasks

    urls, settings = two_apps
    b = urls[APPS[1]]
    assert wait_for(lambda: len(httpx.get(f"{b}/healthz").json()["replicas"]) == 2, timeout_s=120)
    [task] = add_tasks(settings, [registry_for(settings).local_path("demo-v1")], 1, prefix="routed")
    assert wait_for(lambda: all(r["tasks"].get(task, {}).get("active") == f"{task}-v1"
                                for r in httpx.get(f"{b}/healthz").json()["replicas"]), timeout_s=60)

    def replica_answering() -> str | None:
        answer = httpx.post(f"{b}/predict", json={"prompt": DRIFTED[0].prompt, "task": task, "max_tokens": 8},
                            timeout=60)
        return answer.headers["x-flywheel-replica"] if answer.status_code == 200 else None

    deadline = time.monotonic() + 30
    while (first := replica_answering()) is None:  # the gateway's list of tasks lags by up to 2 s
        assert time.monotonic() < deadline, "the gateway never learned the task"
        time.sleep(0.5)
    time.sleep(3)  # the replica's new task reaches the routers
    answered = [replica_answering() for _ in range(20)]
    assert answered.count(first) >= 16, answered


def test_ops_submit_a_retrain_from_anywhere_as_a_ray_job(served: tuple[str, Settings], demo_home: Path,
                                                        tmp_path: Path) -> None:
    """`flywheel retrain --address <dashboard>`: the run is a Ray job on the cluster, and its verdict and exit
    code come back; a cluster that cannot be reached is a clear error."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    config = tmp_path / "flywheel.yaml"
    config.write_text(yaml.safe_dump(make_settings(home).shareable(), allow_unicode=True))
    dashboard = f"http://127.0.0.1:{served[1].ray.dashboard_port}"

    result = CliRunner().invoke(cli, ["retrain", "--address", dashboard, "--config", str(config), "--wait",
                                      "--json"])
    assert result.exit_code == 2, result.output  # nothing curated in this home: too little data
    payload = json.loads(result.stdout[result.stdout.rindex("\n{\n") + 1:] if "\n{\n" in result.stdout
                         else result.stdout)
    assert payload["job_id"].startswith("flywheel-retrain-") and payload["verdict"] == "insufficient_data"
    [record] = RunStore(home / "runs").list()
    assert record.run_id == payload["run_id"] and record.trigger == "ray-job"

    nowhere = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["retrain", "--address", nowhere, "--task", "demo"])
    assert result.exit_code == 2 and f"cannot submit the retrain to the Ray cluster at {nowhere}" in result.output
