"""The serving <-> feedback contract: events, the POST /feedback body, the wire format."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from feedback.dataset import SCHEMA
from feedback.schemas import (
    CuratedExample,
    FeedbackAccepted,
    FeedbackEvent,
    FeedbackRequest,
    PredictionEvent,
    decode_event,
    encode_event,
)
from tests.kafka_broker import feedback, prediction

RID = uuid.uuid4().hex


def _error_fields(exc: ValidationError) -> set[str]:
    """The fields named (the first part of each location; the rest names union members, not fields)."""
    return {str(e["loc"][0]) for e in exc.errors() if e["loc"]}


@pytest.mark.parametrize(("body", "field"), [
    ({"rating": 5}, "request_id"),
    ({"request_id": "not-a-uuid", "rating": 5}, "request_id"),
    ({"request_id": RID.upper(), "rating": 5}, "request_id"),
    ({"request_id": RID, "rating": 0}, "rating"),
    ({"request_id": RID, "rating": 6}, "rating"),
    ({"request_id": RID, "rating": "great"}, "rating"),
    ({"request_id": RID, "rating": True}, "rating"),
    ({"request_id": RID, "rating": 4.5}, "rating"),
    ({"request_id": RID, "thumb": "sideways"}, "thumb"),
    ({"request_id": RID, "rating": 3, "event_id": "has space"}, "event_id"),
    ({"request_id": RID, "rating": 3, "event_id": "x" * 65}, "event_id"),
    ({"request_id": RID, "rating": 3, "user_id": ""}, "user_id"),
    ({"request_id": RID, "correction": ""}, "correction"),
    ({"request_id": RID, "rating": 3, "surprise": 1}, "surprise"),
])
def test_each_bad_field_is_named(body: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        FeedbackRequest.model_validate(body)
    assert field in _error_fields(info.value)


def test_feedback_must_say_something() -> None:
    with pytest.raises(ValidationError, match="at least one of `rating`, `thumb` or `correction`"):
        FeedbackRequest(request_id=RID, comment="just a comment")
    for body in ({"rating": 1}, {"thumb": "down"}, {"correction": "negative"}):
        FeedbackRequest.model_validate({"request_id": RID, **body})


def test_size_limits_come_from_config() -> None:
    request = FeedbackRequest(request_id=RID, correction="c" * 11, comment="m" * 5)
    assert request.check_limits(max_correction_chars=10, max_comment_chars=5) == [
        ("correction", "is 11 characters; the limit is 10")
    ]
    assert request.check_limits(max_correction_chars=11, max_comment_chars=4) == [
        ("comment", "is 5 characters; the limit is 4")
    ]
    assert request.check_limits(100, 100) == []


def test_to_event_takes_identity_from_the_caller_not_the_body() -> None:
    """rater, user and tenant come from the credentials; a client's event id lives in its rater's namespace."""
    body = FeedbackRequest(request_id=RID, thumb="up", event_id="client-42", tenant_id="acme", user_id="mallory")
    given = body.to_event("key-a", authenticated=True, user_id=None, tenant_id="t1")
    assert (given.request_id, given.thumb, given.rater, given.authenticated) == (RID, "up", "key-a", True)
    assert (given.user_id, given.tenant_id) == (None, "t1")
    assert len(given.event_id) == 32 and given.event_id == body.to_event("key-a", True, None, None).event_id
    assert body.to_event("key-b", True, None, None).event_id != given.event_id  # no collisions across raters
    made = FeedbackRequest(request_id=RID, rating=4).to_event("key-a", True, None, None)
    assert made.timestamp.tzinfo is UTC and made.schema_version == 1
    assert FeedbackAccepted(event_id=made.event_id).model_dump() == {"event_id": made.event_id}


def test_a_blind_retry_without_an_event_id_names_the_same_event() -> None:
    """A client that resends the same verdict (a timeout, a retry loop) is curated once."""
    verdict = {"request_id": RID, "rating": 2, "correction": "积极", "user_id": "u1"}

    def event_id(body: dict) -> str:
        return FeedbackRequest(**body).to_event("key-a", True, None, None).event_id

    first, retry = event_id(verdict), event_id(dict(reversed(verdict.items())))
    assert first == retry
    others = [{**verdict, "rating": 3}, {**verdict, "correction": "消极"}, {**verdict, "user_id": "u2"},
              {**verdict, "request_id": "f" * 32}, {**verdict, "comment": "late"}]
    ids = {event_id(other) for other in others}
    assert len(ids) == len(others) and first not in ids
    assert event_id({**verdict, "request_id": f"chatcmpl-{RID}"}) == first


def test_events_round_trip_through_bytes_by_event_type() -> None:
    pred = prediction(RID, messages=[{"role": "user", "content": "line one\nline two"}], prompt=None)
    fb = feedback(RID, correction="negative\n(not positive)")
    for event in (pred, fb):
        data = encode_event(event)
        assert b"\n" not in data  # one record per line in the local log and the spool
        assert decode_event(data) == event
    assert isinstance(decode_event(encode_event(pred)), PredictionEvent)
    assert isinstance(decode_event(encode_event(fb)), FeedbackEvent)


def test_timestamps_are_utc_and_must_be_aware() -> None:
    shanghai = datetime(2026, 1, 2, 8, 0, tzinfo=timezone(timedelta(hours=8)))
    assert prediction(RID, timestamp=shanghai).timestamp == datetime(2026, 1, 2, 0, 0, tzinfo=UTC)
    with pytest.raises(ValidationError):
        prediction(RID, timestamp=datetime(2026, 1, 2))


def test_unknown_versions_and_types_are_refused() -> None:
    good = encode_event(feedback(RID)).decode()
    for bad in (good.replace('"schema_version":1', '"schema_version":2'),
                good.replace('"event_type":"feedback"', '"event_type":"click"'),
                '{"event_type": "prediction"}', "not json"):
        with pytest.raises(ValidationError):
            decode_event(bad)


def test_prediction_needs_an_input() -> None:
    with pytest.raises(ValidationError, match="`prompt` or `messages`"):
        prediction(RID, prompt=None)


def test_dataset_schema_matches_the_curated_example() -> None:
    assert SCHEMA.names == list(CuratedExample.model_fields)
