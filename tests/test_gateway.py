"""The gateway's request path, without a live app: the parts a route leans on."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from feedback import pii
from feedback.schemas import FeedbackEvent, PredictionEvent
from flywheel.tasks import TaskSpec
from services.adapters import PINNED_RETRY_AFTER_S, PinnedAdaptersBusyError
from services.gateway import Gateway
from services.metrics import GatewayMetrics, RecentAnswers
from services.protocol import PredictRequest
from tests.conftest import make_settings
from tests.kafka_broker import feedback, prediction


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

    gateway = bare_gateway(settings=make_settings(tmp_path), llm=BusyLLM(), metrics=GatewayMetrics(),
                           _tasks={"demo": TaskSpec(name="demo")}, _tasks_read_at=time.monotonic())
    response = await gateway.predict(PredictRequest(prompt="hello", task="demo", version="demo-v2"))
    assert response.status_code == 503 and response.headers["retry-after"] == str(PINNED_RETRY_AFTER_S)
    assert "demo-v2" in json.loads(response.body)["error"]
