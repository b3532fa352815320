"""The gateway's request path, without a live app: the parts a route leans on."""

from __future__ import annotations

import threading
import uuid
from types import SimpleNamespace

import pytest

from feedback import pii
from feedback.schemas import FeedbackEvent, PredictionEvent
from services.gateway import Gateway
from services.metrics import GatewayMetrics, RecentAnswers
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
