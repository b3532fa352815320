"""Fixtures for the feedback tests: the real dev Kafka broker, settings per backend, event factories.

The broker is Apache Kafka 0.9.0.1 + ZooKeeper started once per session by deploy/local/kafka.sh
(installed on first use into ~/.cache/flywheel/kafka, or $FLYWHEEL_KAFKA_CACHE) and stopped by pid.
Registered from tests/conftest.py with `pytest_plugins`.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from feedback.schemas import FeedbackEvent, FeedbackRequest, PredictionEvent
from flywheel.config import Settings

KAFKA_SH = Path(__file__).resolve().parents[1] / "deploy" / "local" / "kafka.sh"
# Delivery tests run against both: the embedded local log, and Kafka (marked, so `-m "not kafka"` skips it).
BACKENDS = ["local", pytest.param("kafka", marks=pytest.mark.kafka)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: needs the real dev Kafka broker (Java 17; npm on first use)")


@dataclass
class KafkaBroker:
    state_dir: Path
    bootstrap: str = ""

    def _script(self, action: str) -> str:
        done = subprocess.run([str(KAFKA_SH), action, str(self.state_dir)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            pytest.fail(f"kafka.sh {action} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done.stdout

    def start(self) -> str:
        """Start (or restart: same ports, same data) and return the bootstrap address it printed last."""
        self.bootstrap = self._script("start").strip().splitlines()[-1]
        return self.bootstrap

    def stop(self) -> None:
        self._script("stop")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    started = time.monotonic()
    broker.start()
    print(f"kafka broker at {broker.bootstrap} in {time.monotonic() - started:.1f}s")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def feedback_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Settings]:
    """`make(backend, **feedback)`: settings on a fresh home, with topics and a group of their own."""

    def make(backend: str, home: Path | None = None, **feedback: object) -> Settings:
        tag = uuid.uuid4().hex[:8]
        options: dict[str, object] = {
            "predictions_topic": f"test.{tag}.predictions", "feedback_topic": f"test.{tag}.feedback",
            "consumer_group": f"test-{tag}", "curator_batch_size": 100, "curator_flush_s": 0.2,
        }
        if backend == "kafka":
            options |= {"kafka_bootstrap": request.getfixturevalue("kafka_broker").bootstrap,
                        "kafka_api_version": "0.9"}
        return Settings(home=home or tmp_path / f"home-{tag}", feedback={**options, **feedback})

    return make


def write_config(settings: Settings, path: Path) -> Path:
    """The feedback part of `settings` as a YAML file for `--config` (for CLI and subprocess tests)."""
    path.write_text(yaml.safe_dump(json.loads(settings.model_dump_json(include={"home", "feedback"}))))
    return path


def prediction(request_id: str, i: int = 0, **fields: object) -> PredictionEvent:
    values: dict[str, object] = {"request_id": request_id, "prompt": f"Sentiment of headline {i}: shares rose 3.5%",
                                 "answer": "positive", "reasoning": "rose is good news",
                                 "adapter_version": f"demo-v{1 + i % 2}", "latency_ms": 12.5,
                                 "prompt_tokens": 9, "completion_tokens": 3}
    return PredictionEvent.model_validate(values | fields)


def feedback(request_id: str, i: int = 0, **fields: object) -> FeedbackEvent:
    values: dict[str, object] = {"request_id": request_id, "rating": 1 + i % 5, "comment": f"n={i}"}
    request = FeedbackRequest.model_validate(values | fields)
    return request.to_event(f"rater-{i}", authenticated=True, user_id=request.user_id, tenant_id=request.tenant_id)


def event_pairs(n: int) -> list[tuple[PredictionEvent, FeedbackEvent]]:
    ids = [uuid.uuid4().hex for _ in range(n)]
    return [(prediction(rid, i), feedback(rid, i)) for i, rid in enumerate(ids)]


def interleaved(pairs: list[tuple[PredictionEvent, FeedbackEvent]]) -> list[PredictionEvent | FeedbackEvent]:
    """Publish order: most predictions before their feedback; every third right after it, every tenth
    only after all the feedback (so it arrives batches later)."""
    events: list[PredictionEvent | FeedbackEvent] = []
    late: list[PredictionEvent | FeedbackEvent] = []
    for i, (pred, fb) in enumerate(pairs):
        if i % 10 == 0:
            events.append(fb)
            late.append(pred)
        else:
            events += [fb, pred] if i % 3 == 0 else [pred, fb]
    return events + late


def publish(settings: Settings, events: list[PredictionEvent | FeedbackEvent]) -> None:
    """Put `events` on the settings' bus (the local log or the broker), all of them acknowledged."""
    from feedback.bus import build_bus

    bus = build_bus(settings)
    try:
        for event in events:
            assert bus.publish(event)
        assert bus.flush(timeout_s=60), bus.stats()
    finally:
        bus.close()
