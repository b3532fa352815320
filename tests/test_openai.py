"""The OpenAI API as clients speak it: the official `openai` client against the live app (Ray Serve + vLLM)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from flywheel.config import Settings
from flywheel.registry import registry_for

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

PROMPT = "Analyze the sentiment of this news: Acme shares surged"


@pytest.fixture
def client(served: tuple[str, Settings]) -> openai.OpenAI:
    url, settings = served
    registry = registry_for(settings)
    if registry.alias("champion") != "demo-v1":
        registry.promote("demo-v1", actor="test", reason="reset")
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/healthz").json()["serving"] != ["demo-v1"] and time.monotonic() < deadline:
        time.sleep(0.2)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_models_complete_stream_and_rate_with_the_official_client(client: openai.OpenAI,
                                                                   served: tuple[str, Settings]) -> None:
    url, _ = served
    ids = {m.id for m in client.models.list().data}
    assert {"demo", "demo@demo-v1"} <= ids

    completion = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_completion_tokens=48)
    message = completion.choices[0].message
    assert completion.model == "demo-v1" and completion.id.startswith("chatcmpl-")
    assert message.content and message.model_extra["reasoning_content"] == message.model_extra["reasoning"] != ""
    predicted = httpx.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": 48}, timeout=60).json()
    assert (message.content, message.model_extra["reasoning"]) == (predicted["answer"], predicted["reasoning"])
    assert completion.usage.completion_tokens > 0 and completion.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_completion_tokens=48,
        stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and {c.model for c in chunks} == {"demo-v1"}
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert (content, reasoning) == (message.content, message.model_extra["reasoning"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == completion.usage.completion_tokens

    rated = httpx.post(f"{url}/feedback", json={"request_id": completion.id, "rating": 5})
    assert rated.status_code == 202, rated.text

    # each served request is one line in the replica's own request log (`serving.request_log: file`)
    def logged() -> str:
        return "".join(p.read_text() for p in (served[1].home / "logs").glob("requests-*.log"))

    deadline = time.monotonic() + 10  # written by the log's own thread
    while rated.json()["event_id"] not in logged() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = logged()
    chat_id = completion.id.removeprefix("chatcmpl-")
    for line in (f"event=chat request_id={chat_id}", f"event=predict request_id={predicted['request_id']}",
                 f"event=feedback event_id={rated.json()['event_id']}"):
        assert line in lines, lines[-2000:]


def test_clear_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-task", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found" and "demo" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], n=2)
    assert two.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="demo", messages=[])
    assert empty.value.body["param"] == "messages" and "Traceback" not in empty.value.body["message"]
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "surged " * 500}],
                                       max_completion_tokens=200)
    body = long.value.body
    assert body["code"] == "context_length_exceeded" and "512" in body["message"], body
    assert "Traceback" not in body["message"] and "pid=" not in body["message"] and "File " not in body["message"]


def test_load_tools_fixed_answer_lengths(client: openai.OpenAI) -> None:
    """vLLM's `ignore_eos` and `min_tokens`, which load tools send, make answers as long as asked."""
    chat = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_completion_tokens": 40}
    natural = client.chat.completions.create(**chat)
    assert natural.usage.completion_tokens < 24, "the demo model ends its answers early on its own"
    fixed = client.chat.completions.create(**chat, extra_body={"ignore_eos": True})
    assert (fixed.usage.completion_tokens, fixed.choices[0].finish_reason) == (40, "length")
    floored = client.chat.completions.create(**chat, extra_body={"min_tokens": 24})
    assert floored.usage.completion_tokens >= 24
    chunks = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 40
    with pytest.raises(openai.BadRequestError) as over:
        client.chat.completions.create(**chat, extra_body={"min_tokens": 41})
    assert over.value.body["param"] == "min_tokens" and "40" in over.value.body["message"]


def test_a_promote_during_concurrent_streams_cuts_none(client: openai.OpenAI, served: tuple[str, Settings]) -> None:
    _, settings = served
    results: list[tuple[set[str], str]] = []
    failures: list[BaseException] = []

    def stream() -> None:
        try:
            chunks = list(client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": PROMPT}], temperature=0,
                max_completion_tokens=48, stream=True))
            results.append(({c.model for c in chunks}, "".join(c.choices[0].delta.content or "" for c in chunks
                                                              if c.choices)))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    registry_for(settings).promote("demo-v2", actor="test", reason="swap under streams")
    for thread in threads:
        thread.join(timeout=180)
    assert not failures, failures
    assert len(results) == 8 and all(len(models) == 1 for models, _ in results), results
    assert all(answer for _, answer in results)


def test_a_pinned_version_answers_beside_the_champion(client: openai.OpenAI, served: tuple[str, Settings]) -> None:
    """`task@version` (and /predict's `version`) answers with that version; the champion keeps serving."""
    url, _ = served
    assert "demo@demo-v2" in {m.id for m in client.models.list().data}
    pinned = client.chat.completions.create(
        model="demo@demo-v2", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_completion_tokens=48)
    assert pinned.model == "demo-v2"
    predicted = httpx.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": 48, "version": "demo-v2"},
                           timeout=60).json()
    assert predicted["adapter_version"] == "demo-v2" and predicted["answer"] == pinned.choices[0].message.content
    streamed = list(client.chat.completions.create(
        model="demo@demo-v2", messages=[{"role": "user", "content": PROMPT}], temperature=0,
        max_completion_tokens=48, stream=True))
    assert {c.model for c in streamed} == {"demo-v2"}
    assert client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}],
                                          max_completion_tokens=8).model == "demo-v1"  # the champion is untouched
    metrics = httpx.get(f"{url}/metrics").text
    assert 'flywheel_pinned_adapter_resident{replica=' in metrics and 'version="demo-v2"' in metrics

    for model in ("demo@demo-v99", "demo@faq-v1", "demo@../../etc"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        body = missing.value.body
        assert body["code"] == "model_not_found" and str(served[1].home) not in body["message"], body
    refused = httpx.post(f"{url}/predict", json={"prompt": "hi", "version": "demo-v99"}, timeout=60)
    assert refused.status_code == 404 and refused.json()["detail"][0]["field"] == "version", refused.text
    assert str(served[1].home) not in refused.text


def test_predict_streams_too(client: openai.OpenAI, served: tuple[str, Settings]) -> None:
    url, _ = served
    whole = httpx.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": 48}, timeout=60).json()
    events = []
    with httpx.stream("POST", f"{url}/predict", json={"prompt": PROMPT, "max_tokens": 48, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas, final = events[:-1], events[-1]
    assert len(deltas) >= 2 and final["done"] is True
    assert "".join(e["answer"] for e in deltas) == final["answer"] == whole["answer"]
    assert "".join(e["reasoning"] for e in deltas) == final["reasoning"] == whole["reasoning"]
    assert final["adapter_version"] == "demo-v1" and final["usage"]["completion_tokens"] > 0
    rated = httpx.post(f"{url}/feedback", json={"request_id": final["request_id"], "rating": 4})
    assert rated.status_code == 202
    refused = httpx.post(f"{url}/predict", json={"prompt": "surged " * 500, "max_tokens": 200, "stream": True})
    assert refused.status_code == 400 and refused.json()["detail"][0]["field"] == "prompt"


def test_more_tasks_than_a_replica_holds_each_answer_with_their_own_version(client: openai.OpenAI,
                                                                          served: tuple[str, Settings]) -> None:
    """Past the replica's LoRA capacity, LoRAs are loaded when a request needs them and the least recently used
    idle one makes room: every task still answers with its own adapter, and the evictions show in /metrics."""
    from loadtests.bench_openai import add_tasks

    url, settings = served
    [replica] = httpx.get(f"{url}/healthz").json()["replicas"]
    registry = registry_for(settings)
    sources = {"demo-v1": registry.local_path("demo-v1"), "demo-v2": registry.local_path("demo-v2")}
    tasks = add_tasks(settings, list(sources.values()), replica["loras"]["capacity"] + 2, prefix="many")
    deadline = time.monotonic() + 60
    while not set(tasks) <= set(httpx.get(f"{url}/healthz").json()["tasks"]) and time.monotonic() < deadline:
        time.sleep(0.5)  # replicas look for new tasks every 2 s

    def ask(model: str) -> tuple[str, str]:
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                temperature=0, max_completion_tokens=24)
        return answer.model, answer.choices[0].message.content

    # The replica may have found all the new tasks in one look and preloaded their champions at once, past its
    # capacity (loads in flight hold places that no eviction can free); the loads after that evict back down.
    assert [ask(task)[0] for task in tasks] == [f"{task}-v1" for task in tasks]
    expected = {version: ask(f"demo@{version}")[1] for version in sources}
    assert expected["demo-v1"] != expected["demo-v2"], "the two source adapters must answer differently"
    for _ in range(2):  # round robin over more tasks than fit: each request may need a load
        for i, task in enumerate(tasks):
            version, content = ask(task)
            assert version == f"{task}-v1" and content == expected[list(sources)[i % 2]], (task, version, content)

    metrics = httpx.get(f"{url}/metrics").text
    evicted = [line for line in metrics.splitlines() if line.startswith("flywheel_lora_evictions_total{")]
    assert evicted and sum(float(line.rsplit(" ", 1)[1]) for line in evicted) >= len(tasks), evicted
    reloaded = [line for line in metrics.splitlines()
                if line.startswith("flywheel_lora_loads_total{") and 'version="many-' in line]
    assert any(float(line.rsplit(" ", 1)[1]) >= 2 for line in reloaded), reloaded
