"""The gateway's request path, without a live app: the parts a route leans on."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from feedback import pii
from feedback.schemas import FeedbackEvent, PredictionEvent
from flywheel.registry import registry_for
from flywheel.tasks import TaskSpec
from services.access import Access
from services.adapters import BUSY_RETRY_AFTER_S, PinnedAdaptersBusyError
from services.gateway import Gateway, TtlCache
from services.metrics import GatewayMetrics, RecentAnswers
from services.protocol import PredictRequest
from tests.conftest import make_settings
from tests.kafka_broker import feedback, prediction
from tests.test_registry import BASE, fake_adapter


def local_request() -> Request:
    """A request from loopback without a key (open mode)."""
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [], "client": ("127.0.0.1", 9)})


def bare_gateway(**attributes: object) -> Gateway:
    """A gateway object without Serve or a registry behind it, holding just `attributes`."""
    gateway = object.__new__(Gateway.func_or_class)
    gateway.__dict__.update(attributes)
    return gateway


async def test_events_are_masked_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Masking costs time on every character of a prompt: it must not hold the loop other requests wait on."""
    masked_on: list[int] = []
    mask_pii = pii.mask_pii

    def spied_mask_pii(text: str) -> str:
        masked_on.append(threading.get_ident())
        return mask_pii(text)

    monkeypatch.setattr(pii, "mask_pii", spied_mask_pii)  # (Serve's ingress copies the gateway's globals: not there)
    published: list[PredictionEvent | FeedbackEvent] = []
    gateway = bare_gateway(settings=SimpleNamespace(feedback=SimpleNamespace(mask_at_source=True), default_task="demo"),
                           answers=RecentAnswers(), metrics=GatewayMetrics(),
                           bus=SimpleNamespace(publish=lambda event: published.append(event) or True))
    request_id = uuid.uuid4().hex
    events = [prediction(request_id), feedback(request_id)]
    for event in events:
        assert await gateway._publish(event)
    assert published == events and masked_on and threading.get_ident() not in masked_on


async def test_a_pinned_version_with_no_room_is_a_503_with_retry_after(tmp_path: Path) -> None:
    class BusyLLM:
        async def generate(self, *_: object) -> None:
            raise PinnedAdaptersBusyError("all 2 pinned versions are answering requests")

    settings = make_settings(tmp_path)
    gateway = bare_gateway(settings=settings, llm=BusyLLM(), metrics=GatewayMetrics(), access=Access(settings),
                           _tasks=TtlCache(lambda: {"demo": TaskSpec(name="demo")}, ttl_s=60))
    response = await gateway.predict(PredictRequest(prompt="hello", task="demo", version="demo-v2"), local_request())
    assert response.status_code == 503 and response.headers["retry-after"] == str(BUSY_RETRY_AFTER_S)
    assert "demo-v2" in json.loads(response.body)["error"]


async def test_a_ttl_cache_reads_once_for_a_burst_and_again_once_stale() -> None:
    reads: list[int] = []
    cache = TtlCache(lambda: reads.append(len(reads)) or len(reads), ttl_s=60)
    assert await asyncio.gather(*(cache.get() for _ in range(10))) == [1] * 10 and len(reads) == 1
    cache.ttl_s = 0
    assert await cache.get() == 2


async def test_models_and_healthz_answer_from_a_cached_view_of_the_registry(tmp_path: Path) -> None:
    """Unauthenticated routes: calling them in a loop must not read the registry on every call."""
    settings = make_settings(tmp_path)
    demo = registry_for(settings, "demo")
    demo.promote(demo.register(fake_adapter(tmp_path / "a1"), base=BASE).version, actor="test")
    gateway = bare_gateway(settings=settings, access=Access(settings), metrics=GatewayMetrics())
    gateway._cache_registry_views()

    async def model_ids() -> set[str]:
        return {card.id for card in (await gateway.models(local_request())).data}

    assert await model_ids() == {"demo", "demo@demo-v1"}
    assert await gateway._champions.get() == {"demo": "demo-v1"}
    demo.promote(demo.register(fake_adapter(tmp_path / "a2", b"two"), base=BASE).version, actor="test")
    assert await model_ids() == {"demo", "demo@demo-v1"}  # within TASKS_TTL_S: the view read before
    assert await gateway._champions.get() == {"demo": "demo-v1"}
    gateway._ready_versions.ttl_s = gateway._champions.ttl_s = 0
    assert await model_ids() == {"demo", "demo@demo-v1", "demo@demo-v2"}
    assert await gateway._champions.get() == {"demo": "demo-v2"}


async def test_healthz_reads_the_curator_reports_once_for_a_burst(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The curators' reports sit on the dataset's store: a client polling /healthz must not read them per call."""
    settings = make_settings(tmp_path)
    reads: list[int] = []
    gateway_globals = Gateway.func_or_class._feedback_health.__globals__  # (Serve's ingress copies the module's)
    read_curators = gateway_globals["read_curators"]
    monkeypatch.setitem(gateway_globals, "read_curators", lambda s: reads.append(len(reads)) or read_curators(s))

    async def no_replicas() -> list[dict]:
        return []

    gateway = bare_gateway(settings=settings, access=Access(settings), metrics=GatewayMetrics(), loop=None,
                           bus=SimpleNamespace(stats=lambda: {"backend": "local", "pending": 0}),
                           _refresh_replicas=no_replicas)
    gateway._cache_registry_views()
    first = await gateway.healthz(local_request())
    assert (await gateway.healthz(local_request())).feedback == first.feedback and len(reads) == 1
    gateway._feedback_view.ttl_s = 0
    await gateway.healthz(local_request())
    assert len(reads) == 2  # stale: read again


async def test_a_correction_that_is_not_one_of_a_classification_tasks_labels_is_a_422(tmp_path: Path) -> None:
    """It used to be curated, confirmed and trained on, teaching the model to answer outside its labels."""
    from collections import OrderedDict

    from feedback.schemas import FeedbackRequest

    settings = make_settings(tmp_path)
    published: list[PredictionEvent | FeedbackEvent] = []
    triage = TaskSpec(name="triage", kind="classification", labels=["urgent", "routine"])
    gateway = bare_gateway(settings=settings, access=Access(settings), metrics=GatewayMetrics(),
                           answers=RecentAnswers(), _recent_feedback=OrderedDict(),
                           _tasks=TtlCache(lambda: {"triage": triage, "faq": TaskSpec(name="faq")}, ttl_s=60),
                           bus=SimpleNamespace(publish=lambda event: published.append(event) or True))
    asked = {task: uuid.uuid4().hex for task in ("triage", "faq")}
    for task, request_id in asked.items():
        gateway.answers.remember(request_id, task, f"{task}-v1", None)

    async def correct(task: str, correction: str) -> tuple[int, dict]:
        body = FeedbackRequest.model_validate({"request_id": asked[task], "correction": correction})
        response = await gateway.feedback(body, local_request())
        return response.status_code, json.loads(response.body)

    status, body = await correct("triage", "critical")
    assert status == 422 and "urgent, routine" in body["error"] and body["detail"][0]["field"] == "correction"
    assert not published
    assert (await correct("triage", " Urgent "))[0] == 202  # a label, spacing and case aside
    assert (await correct("triage", "it is serious</think>routine"))[0] == 202  # reasoning, then a label
    assert (await correct("faq", "critical"))[0] == 202  # a generation task takes any answer
    assert len(published) == 3
