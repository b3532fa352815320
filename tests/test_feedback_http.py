"""The feedback proof over real HTTP: every rating sent to /feedback is curated exactly once.

Runs against the embedded local log (the `served` app) and against a real Kafka broker that is
stopped and restarted in the middle of the calls (a second app on the same Serve instance).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from feedback.curator import Curator
from feedback.dataset import CuratedDataset
from feedback.pii import pseudonym
from flywheel.auth import KeyStore
from flywheel.config import Settings
from tests.conftest import make_settings
from training.demo_task import generate_examples

pytestmark = [pytest.mark.serve, pytest.mark.vllm]

N = 400
PROMPTS = [e.prompt for e in generate_examples(50, seed=31)]


async def exercise(url: str, n: int, halfway: Callable[[], None] | None = None) -> dict[str, dict]:
    """n predictions, each followed by one rating (every 10th with a correction); returns them by request_id.

    Every 50th rating is sent twice with the same event_id: it must be curated once. The event ids are the ones
    /feedback answered with (a client's own id is kept in its rater's namespace).
    """
    sent: dict[str, dict] = {}
    statuses: list[int] = []
    gate = asyncio.Semaphore(16)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with gate:
            predicted = (await client.post(f"{url}/predict", json={"prompt": PROMPTS[i % len(PROMPTS)],
                                                                   "max_tokens": 8})).json()
            body = {"request_id": predicted["request_id"], "rating": 1 + i % 5, "event_id": f"ev-{i}"}
            if i % 10 == 0:
                body["correction"] = "积极"
            accepted = set()
            for _ in range(2 if i % 50 == 0 else 1):
                response = await client.post(f"{url}/feedback", json=body)
                statuses.append(response.status_code)
                accepted.add(response.json().get("event_id"))
            assert len(accepted) == 1, "a resubmission with the same event_id names the same event"
            sent[predicted["request_id"]] = {**body, "event_id": accepted.pop(), "answer": predicted["answer"],
                                             "adapter_version": predicted["adapter_version"]}

    async with httpx.AsyncClient(timeout=60) as client:
        first = [one(client, i) for i in range(n // 2)]
        await asyncio.gather(*first)
        if halfway:
            await asyncio.to_thread(halfway)
        await asyncio.gather(*(one(client, i) for i in range(n // 2, n)))
    assert set(statuses) == {202}, f"/feedback answered {set(statuses)}"
    return sent


def assert_curated_exactly_once(settings: Settings, sent: dict[str, dict]) -> None:
    """Every rating sent is curated exactly once (other tests on the same app may add rows of their own)."""
    curator = Curator(settings)
    try:
        deadline = time.monotonic() + 180
        rows = []
        while time.monotonic() < deadline:
            curator.drain(timeout_s=60)
            rows = [r for r in CuratedDataset(settings.feedback_dir / "dataset").examples() if r.request_id in sent]
            if len(rows) >= len(sent):
                break
            time.sleep(1)
    finally:
        curator.close()
    assert len(rows) == len(sent) == N
    assert len({r.event_id for r in rows}) == N, "duplicate curated rows"
    for row in rows:
        expected = sent[row.request_id]
        assert row.event_id == expected["event_id"] and row.rating == expected["rating"]
        assert row.answer == expected["answer"] and row.adapter_version == expected["adapter_version"]
        assert row.correction == expected.get("correction")


def test_every_rating_is_curated_once_through_the_local_log(served: tuple[str, Settings]) -> None:
    url, settings = served
    sent = asyncio.run(exercise(url, N))
    assert_curated_exactly_once(settings, sent)


def test_personal_data_never_reaches_the_feedback_log(served: tuple[str, Settings]) -> None:
    """With `mask_at_source` (the default) the gateway masks before the event is written anywhere."""
    url, settings = served
    email, card, phone = "jane.doe@example.com", "4111 1111 1111 1111", "13812345678"
    _, key = KeyStore(settings.registry_uri).create(f"backend-{uuid.uuid4().hex[:6]}",
                                                    ["predict", "feedback", "act-for-users"])
    backend = {"Authorization": f"Bearer {key}"}  # vouches for its users: their ids are identities, pseudonymised
    answer = httpx.post(f"{url}/predict", json={"prompt": f"I am {email}, card {card}", "max_tokens": 4, "user": email},
                        headers=backend, timeout=60).json()
    rated = httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "rating": 1, "user_id": email,
                                                "comment": f"call me on {phone}"},  # (a correction must be a label)
                       headers=backend, timeout=30)
    assert rated.status_code == 202, rated.text
    logged = b"".join(p.read_bytes() for p in (settings.feedback_dir / "log").glob("*.log")).decode()
    assert answer["request_id"] in logged  # both events are there ...
    assert email not in logged and card not in logged and phone not in logged  # ... with nothing personal
    assert "I am [EMAIL], card [CARD]" in logged and "call me on [PHONE]" in logged
    assert pseudonym(email) in logged


@pytest.fixture
def kafka_app(served: tuple[str, Settings], demo_home: Path, kafka_broker, tmp_path: Path) -> Iterator[tuple]:
    """A second flywheel app on the same Serve instance, its feedback on the real Kafka broker."""
    from ray import serve

    from services import app as serve_app

    home = tmp_path / "kafka-home"
    shutil.copytree(demo_home, home)
    settings = make_settings(home, engine="vllm", port=served[1].serving.port)
    settings.feedback.kafka_bootstrap = kafka_broker.bootstrap
    settings.feedback.kafka_api_version = "0.9"
    settings.serving.app_name = "flywheel-kafka"
    url = serve_app.run(settings, route_prefix="/kafka", timeout_s=600)
    try:
        yield url, settings, kafka_broker
    finally:
        serve.delete("flywheel-kafka")


@pytest.mark.kafka
def test_every_rating_is_curated_once_through_kafka_despite_an_outage(kafka_app: tuple) -> None:
    url, settings, broker = kafka_app

    def outage() -> None:
        broker.stop()
        threading.Timer(3.0, broker.start).start()  # comes back while the second half is being sent

    sent = asyncio.run(exercise(url, N, halfway=outage))
    assert_curated_exactly_once(settings, sent)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"request_id": "0" * 32}, "body"),  # says nothing
        ({"request_id": "not-a-request-id", "rating": 3}, "request_id"),
        ({"request_id": "0" * 32, "rating": 6}, "rating"),
        ({"request_id": "0" * 32, "rating": "good"}, "rating"),
        ({"request_id": "0" * 32, "thumb": "sideways"}, "thumb"),
        ({"request_id": "0" * 32, "correction": "x" * 5000}, "correction"),
        ({"request_id": "0" * 32, "rating": 4, "comment": "y" * 3000}, "comment"),
        ({"request_id": "0" * 32, "rating": 4, "event_id": "bad id!"}, "event_id"),
        ({"request_id": "0" * 32, "rating": 4, "extra": 1}, "extra"),
    ],
)
def test_bad_feedback_gets_a_422_naming_the_field(served: tuple[str, Settings], payload: dict, field: str) -> None:
    response = httpx.post(f"{served[0]}/feedback", json=payload, timeout=30)
    assert response.status_code == 422, response.text
    assert field in {d["field"] for d in response.json()["detail"]}, response.text
