"""The serving proof, through real Ray Serve HTTP and the vLLM engine on CPU."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.config import Settings
from flywheel.registry import Registry
from training.demo_task import generate_examples

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

SWAP_BOUND_S = 10.0  # a correctness bound for the flip, not a performance target
DRIFTED_PROMPTS = [e.prompt for e in generate_examples(12, seed=99, distribution="drifted")]


def predict(url: str, prompt: str, **extra: object) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"prompt": prompt, **extra}, timeout=60)


def wait_for_version(url: str, version: str, bound_s: float = SWAP_BOUND_S) -> float:
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        if predict(url, "ping", max_tokens=2).json()["adapter_version"] == version:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"serving did not switch to {version} within {bound_s}s")


@pytest.fixture
def champion_v1(served: tuple[str, Settings], served_registry: Registry) -> Iterator[tuple[str, Registry]]:
    """Each test starts and ends with demo-v1 serving."""
    url, _ = served
    if served_registry.alias("champion") != "demo-v1":
        served_registry.promote("demo-v1", actor="test", reason="reset")
    wait_for_version(url, "demo-v1")
    yield url, served_registry
    if served_registry.alias("champion") != "demo-v1":
        served_registry.promote("demo-v1", actor="test", reason="reset")
    wait_for_version(url, "demo-v1")


def test_predict_answers_with_the_champion(champion_v1: tuple[str, Registry]) -> None:
    url, _ = champion_v1
    response = predict(url, "Analyze the sentiment of this news: Acme shares surged", max_tokens=48)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"request_id", "task", "adapter_version", "answer", "reasoning", "truncated",
                         "finish_reason", "usage", "latency_ms"}
    assert body["adapter_version"] == "demo-v1" and body["task"] == "demo" and not body["truncated"]
    assert body["answer"] and body["reasoning"], body  # the R1 format: reasoning, </think>, answer
    assert "</think>" not in body["answer"]
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    health = httpx.get(f"{url}/healthz").json()
    assert health["status"] == "ok" and health["champion"] == "demo-v1"

    chat = httpx.post(f"{url}/predict", json={"messages": [
        {"role": "user", "content": "Analyze the sentiment of this news: Acme shares surged"}]}, timeout=60)
    assert chat.status_code == 200 and chat.json()["answer"] == body["answer"]


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "   "}, 422, "prompt"),
        ({"prompt": "x" * 5000}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 100000}, 422, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "many"}, 422, "max_tokens"),
        ({"prompt": 5}, 422, "prompt"),
        ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 422, "body"),
        ({}, 422, "body"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
        ({"prompt": "hi", "surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(
    served: tuple[str, Settings], payload: dict, status: int, field: str
) -> None:
    response = httpx.post(f"{served[0]}/predict", json=payload, timeout=30)
    assert response.status_code == status, response.text
    assert field in {d["field"] for d in response.json()["detail"]}, response.text
    assert field in response.json()["error"] or field == "body"


def test_malformed_json_and_prompt_over_the_context(served: tuple[str, Settings]) -> None:
    url = served[0]
    response = httpx.post(f"{url}/predict", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["error"]
    # Under the character limit but over the model's 512-token context: refused before generation.
    long_prompt = " ".join(["surged"] * 600)[:3990]
    response = predict(url, long_prompt, max_tokens=200)
    assert response.status_code == 400 and "context" in response.json()["error"], response.text
    assert "Traceback" not in response.text and "pid=" not in response.text and "File " not in response.text


def test_hot_swap_under_load_drops_nothing(champion_v1: tuple[str, Registry]) -> None:
    url, registry = champion_v1
    v1_answers = [predict(url, p, max_tokens=48).json()["answer"] for p in DRIFTED_PROMPTS]

    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(f"{url}/predict", json={"prompt": DRIFTED_PROMPTS[0], "max_tokens": 24})
                version = r.json().get("adapter_version", "") if r.status_code == 200 else ""
                results.append((time.monotonic(), r.status_code, version))

    clients = [threading.Thread(target=client_loop) for _ in range(4)]
    for c in clients:
        c.start()
    time.sleep(1.0)
    promoted_at = time.monotonic()
    registry.promote("demo-v2", actor="test", reason="swap under load")
    switched = wait_for_version(url, "demo-v2")
    time.sleep(1.0)
    stop.set()
    for c in clients:
        c.join()

    assert results and all(status == 200 for _, status, _ in results), "a request failed during the swap"
    assert {v for _, _, v in results} == {"demo-v1", "demo-v2"}
    after = [v for t, _, v in results if t > promoted_at + switched + 0.5]
    assert after and set(after) == {"demo-v2"}, "requests went back to v1 after the flip"

    v2_answers = [predict(url, p, max_tokens=48).json()["answer"] for p in DRIFTED_PROMPTS]
    assert v1_answers != v2_answers, "v1 and v2 give identical greedy answers: adapters not really loaded"

    registry.rollback(actor="test", reason="back to v1")
    wait_for_version(url, "demo-v1")
    assert [predict(url, p, max_tokens=48).json()["answer"] for p in DRIFTED_PROMPTS] == v1_answers


def _register_copy(registry: Registry, source: str, tmp_path: Path, edit: str) -> str:
    src = tmp_path / "adapter"
    shutil.copytree(registry.local_path(source), src)
    (src / "manifest.json").unlink()
    if edit == "rank":  # a shape vLLM cannot load (rank above max_lora_rank)
        config = json.loads((src / "adapter_config.json").read_text())
        config["r"] = 64
        (src / "adapter_config.json").write_text(json.dumps(config))
    manifest = registry.register(src, base=registry.manifest(source).base_model, parent=source)
    return manifest.version


def test_corrupt_adapter_never_becomes_champion(champion_v1: tuple[str, Registry], tmp_path: Path) -> None:
    url, registry = champion_v1
    tampered = _register_copy(registry, "demo-v2", tmp_path / "t", edit="none")
    weights = registry.local_path(tampered) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)
    from flywheel.registry import AdapterIntegrityError

    with pytest.raises(AdapterIntegrityError):
        registry.promote(tampered, actor="test")
    assert registry.alias("champion") == "demo-v1"

    # Even if the alias is forced past the checks, the replica verifies and keeps serving v1.
    for bad in (tampered, _register_copy(registry, "demo-v2", tmp_path / "r", edit="rank")):
        registry._move("champion", "promote", lambda _aliases, bad=bad: (bad, "demo-v1"), actor="test",
                       reason="forced")
        deadline = time.monotonic() + SWAP_BOUND_S
        health = {}
        while time.monotonic() < deadline:
            health = httpx.get(f"{url}/healthz").json()
            failures = [r["last_failure"] for r in health["replicas"] if r["last_failure"]]
            if failures and failures[0]["version"] == bad:
                break
            time.sleep(0.1)
        assert health["status"] == "degraded" and health["serving"] == ["demo-v1"], health
        assert failures[0]["kind"].isidentifier() and "error" not in failures[0]  # the message stays in the logs
        assert str(tmp_path) not in json.dumps(health) and str(registry.root) not in json.dumps(health)
        assert predict(url, "ping", max_tokens=4).json()["adapter_version"] == "demo-v1"
        metrics = httpx.get(f"{url}/metrics").text
        replica = health["replicas"][0]["replica"]
        assert f'flywheel_adapter_swap_failed{{replica="{replica}",task="demo",version="{bad}"}} 1.0' in metrics
        registry.promote("demo-v1", actor="test", reason="undo forced alias")
        wait_for_version(url, "demo-v1")


def test_metrics_expose_requests_tokens_and_active_version(champion_v1: tuple[str, Registry]) -> None:
    url, _ = champion_v1
    predict(url, "Analyze the sentiment of this news: Acme shares surged")
    text = httpx.get(f"{url}/metrics").text
    assert 'flywheel_requests_total{route="/predict",status="200"}' in text
    assert 'flywheel_request_latency_seconds_bucket{adapter_version="demo-v1"' in text
    assert 'flywheel_tokens_total{adapter_version="demo-v1",kind="completion"}' in text
    assert 'version="demo-v1"} 1.0' in text and "flywheel_champion_info" in text


def test_metrics_count_ratings_per_version_and_show_what_ops_watch(champion_v1: tuple[str, Registry]) -> None:
    url, _ = champion_v1
    before = _samples(httpx.get(f"{url}/metrics").text)
    for rating in (5, 2):
        answer = predict(url, "Analyze the sentiment of this news: Acme shares surged").json()
        assert httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "rating": rating,
                                                   "thumb": "up"}).status_code == 202
    after = _samples(httpx.get(f"{url}/metrics").text)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('flywheel_ratings_total{kind="rating",task="demo",version="demo-v1"}') == 2
    assert grew('flywheel_rating_value_sum_total{task="demo",version="demo-v1"}') == 7
    assert grew('flywheel_ratings_total{kind="thumb_up",task="demo",version="demo-v1"}') == 2
    for gauge in ("flywheel_spool_pending_events", "flywheel_curator_up", "flywheel_curator_lag_records",
                  "flywheel_curator_lag_seconds"):
        assert gauge in after, gauge
    assert any(name.startswith("flywheel_replica_ongoing_requests{replica=") for name in after)


def _samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample in a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
