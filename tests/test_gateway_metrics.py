"""The gateway's metric families that need no live app: ratings by version, and what ops watch."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from feedback.supervisor import CuratorHealth
from services.metrics import GatewayMetrics, OpsCollector, RecentAnswers


def test_ratings_are_counted_against_the_version_that_answered() -> None:
    answers = RecentAnswers(capacity=2)
    for request_id, version in (("a", "demo-v1"), ("b", "demo-v2"), ("c", "demo-v2")):
        answers.remember(request_id, "demo", version, None)
    assert answers.who("c") == ("demo", "demo-v2") and answers.who("a") == ("unknown", "unknown")  # bounded
    metrics = GatewayMetrics()
    metrics.count_feedback(*answers.who("b"), rating=4, thumb="down", correction="negative")
    metrics.count_feedback(*answers.who("c"), rating=2, thumb=None, correction=None)
    text = generate_latest(metrics.registry).decode()
    assert 'flywheel_ratings_total{kind="rating",task="demo",version="demo-v2"} 2.0' in text
    assert 'flywheel_rating_value_sum_total{task="demo",version="demo-v2"} 6.0' in text
    assert 'flywheel_ratings_total{kind="thumb_down",task="demo",version="demo-v2"} 1.0' in text
    assert 'flywheel_ratings_total{kind="correction",task="demo",version="demo-v2"} 1.0' in text


def test_ops_gauges_read_the_spool_the_curator_and_the_runs() -> None:
    health = CuratorHealth(state="running", since=time.time(), pid=1, lag_records=42, lag_seconds=3.5)
    runs = {"outcomes": {("demo", "rejected"): 3}, "rejections_in_a_row": {"demo": 3},
            "gate": {("demo", "candidate", "golden"): 0.75}}
    metrics = GatewayMetrics()
    metrics.watch(OpsCollector(lambda: {"pending": 7, "oldest_pending_age_s": 12.0}, lambda: health, lambda: runs))
    text = generate_latest(metrics.registry).decode()
    for sample in ("flywheel_spool_pending_events 7.0", "flywheel_spool_oldest_age_seconds 12.0",
                   "flywheel_curator_up 1.0", "flywheel_curator_lag_records 42.0", "flywheel_curator_lag_seconds 3.5",
                   'flywheel_retrain_runs_total{task="demo",verdict="rejected"} 3.0',
                   'flywheel_gate_rejections_in_a_row{task="demo"} 3.0',
                   'flywheel_gate_metric{arm="candidate",slice="golden",task="demo"} 0.75'):
        assert sample in text, sample
    waiting = GatewayMetrics()
    waiting.watch(OpsCollector(lambda: {"pending": 0}, lambda: None, lambda: {**runs, "outcomes": {}}))
    assert "flywheel_curator_up 0.0" in generate_latest(waiting.registry).decode()


def test_a_refusal_travels_as_a_value_and_is_raised_in_the_caller() -> None:
    """Replicas return refusals (Serve would log a raised one with its whole traceback, per request)."""
    import pytest

    from flywheel.registry import AdapterIntegrityError, UnknownTaskError, VersionNotFoundError
    from services.engines.protocol import PromptTooLongError
    from services.llm_client import answered
    from services.protocol import Refusal

    for error in (PromptTooLongError("prompt is 4005 tokens"), UnknownTaskError("unknown task 'x'"),
                  VersionNotFoundError("demo-v9"), AdapterIntegrityError("demo-v3: sha256 mismatch")):
        refusal = Refusal.model_validate_json(Refusal.of(error).model_dump_json())  # as it crosses Ray
        with pytest.raises(type(error), match=str(error).split(":")[0]):
            answered(refusal)
