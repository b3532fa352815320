"""The event contract between serving and feedback, the POST /feedback body, and the curated row.

Events are versioned (`schema_version`) and carry everything in the payload (no Kafka headers: the dev
broker is 0.9). They are keyed by `request_id`, so a request's prediction and its feedback land in the
same partition. On the wire an event is compact JSON with `event_type` as the discriminator.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from flywheel.jsontypes import whole_number

SCHEMA_VERSION = 1

RequestId = Annotated[
    str, Field(pattern=r"^[0-9a-f]{32}$", description="The gateway's request id: uuid4().hex, 32 lowercase hex.")
]
EventId = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Dedupe key: 1..64 of [A-Za-z0-9_-].")
]
Rating = Annotated[
    int, Field(ge=1, le=5, description="1 (bad) .. 5 (good); a JSON integer."), BeforeValidator(whole_number)
]
Thumb = Literal["up", "down"]
OptionalId = Annotated[str | None, Field(min_length=1, max_length=128)]
Identity = Annotated[str, Field(min_length=1, max_length=400)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """One chat turn as the prediction saw it."""

    model_config = ConfigDict(frozen=True)

    role: str = Field(min_length=1)
    content: str


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId
    timestamp: AwareDatetime = Field(default_factory=utc_now)

    @field_validator("timestamp")
    @classmethod
    def _as_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class PredictionEvent(_Event):
    """Emitted by /predict once the answer is known; the curator joins feedback to it."""

    event_type: Literal["prediction"] = "prediction"
    task: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$",
        description="The task that answered; None (events from before tasks) means the default task.",
    )
    prompt: str | None = None
    messages: list[Message] | None = None
    answer: str
    reasoning: str = ""
    adapter_version: str = Field(min_length=1)
    latency_ms: float = Field(ge=0)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    asker: Identity | None = Field(None, description="Who asked, from their credentials (see flywheel.auth.Caller."
                                   "rater); only they may rate the answer when `feedback.rater` is `asker`.")

    @model_validator(mode="after")
    def _has_input(self) -> PredictionEvent:
        if self.prompt is None and self.messages is None:
            raise ValueError("a prediction needs `prompt` or `messages`")
        return self


class _FeedbackFields(BaseModel):
    """What a user can say about an answer; shared by the HTTP body and the event."""

    # The document shows these as optional, not nullable: a body must carry at least one of them
    rating: Rating | SkipJsonSchema[None] = None
    thumb: Thumb | SkipJsonSchema[None] = None
    correction: Annotated[str, Field(min_length=1)] | SkipJsonSchema[None] = Field(
        None, description="The answer the user wanted.")
    comment: str | None = Field(None, min_length=1)
    user_id: OptionalId = None
    tenant_id: OptionalId = None

    @model_validator(mode="after")
    def _says_something(self) -> _FeedbackFields:
        if self.rating is None and self.thumb is None and self.correction is None:
            raise ValueError("give at least one of `rating`, `thumb` or `correction`")
        return self


class FeedbackEvent(_FeedbackFields, _Event):
    """One user's verdict on one prediction. `event_id` makes redelivery and resubmission idempotent."""

    event_type: Literal["feedback"] = "feedback"
    event_id: EventId
    rater: Identity | None = Field(None, description="Who gave the verdict, from their credentials; None: events "
                                   "from before identities, counted as anonymous.")
    authenticated: bool = Field(False, description="The rater showed a key (false: an anonymous caller).")


Event = Annotated[PredictionEvent | FeedbackEvent, Field(discriminator="event_type")]
_EVENT = TypeAdapter[PredictionEvent | FeedbackEvent](Event)


def encode_event(event: PredictionEvent | FeedbackEvent) -> bytes:
    """One line of compact JSON (JSON escapes newlines, so a record never contains b"\\n")."""
    return event.model_dump_json().encode()


def decode_event(data: bytes | str) -> PredictionEvent | FeedbackEvent:
    """Inverse of encode_event; raises pydantic.ValidationError on anything else."""
    return _EVENT.validate_json(data)


def refuse_nulls(data: object, fields: tuple[str, ...]) -> object:
    """An optional field is left out, not sent as null: the document shows it non-nullable, so say so."""
    if isinstance(data, dict):
        nulls = [f for f in fields if f in data and data[f] is None]
        if nulls:
            raise ValueError(f"omit {', '.join(nulls)} instead of sending null")
    return data


class FeedbackRequest(_FeedbackFields):
    """The body of POST /feedback. Size limits come from config: the gateway calls `check_limits`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "anyOf": [{"required": ["rating"]}, {"required": ["thumb"]}, {"required": ["correction"]}]})

    request_id: RequestId = Field(description="From /predict's `request_id`, or an OpenAI completion's `id` "
                                  "(`chatcmpl-<request id>`).")
    event_id: EventId | None = Field(
        None, description="Client-chosen id; a resubmission with the same id is curated once. Without it "
        "the id is derived from the request id and the verdict, so an identical retry also counts once."
    )

    @field_validator("request_id", mode="before")
    @classmethod
    def _completion_id(cls, value: object) -> object:
        return value.removeprefix("chatcmpl-") if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _no_explicit_nulls(cls, data: object) -> object:
        return refuse_nulls(data, ("rating", "thumb", "correction"))

    def check_limits(self, max_correction_chars: int, max_comment_chars: int) -> list[tuple[str, str]]:
        """(field, message) for each text over its configured limit; empty when the request fits."""
        errors = []
        for field, text, limit in (("correction", self.correction, max_correction_chars),
                                   ("comment", self.comment, max_comment_chars)):
            if text is not None and len(text) > limit:
                errors.append((field, f"is {len(text)} characters; the limit is {limit}"))
        return errors

    def to_event(self, rater: str, authenticated: bool, user_id: str | None, tenant_id: str | None
                 ) -> FeedbackEvent:
        """The event as the caller's credentials make it: `rater`, `user_id` and `tenant_id` come from them,
        never from the body (a body's own `user_id` counts only when the caller's key vouches for users)."""
        fields = self.model_dump(exclude={"event_id", "user_id", "tenant_id"})
        return FeedbackEvent(event_id=self.idempotency_key(rater), rater=rater, authenticated=authenticated,
                             user_id=user_id, tenant_id=tenant_id, **fields)

    def idempotency_key(self, rater: str) -> str:
        """The event's id, in the rater's own namespace (one caller's ids never collide with another's): a
        client-chosen `event_id`, else the verdict itself, so a client's blind retry counts once. A rater has
        one verdict per answer whatever the ids: a later one replaces it (feedback.dataset)."""
        verdict = self.event_id or self.model_dump_json(exclude={"event_id"})  # fields in declaration order
        return hashlib.sha256(f"{rater}\n{verdict}".encode()).hexdigest()[:32]


class FeedbackAccepted(BaseModel):
    """The 202 answer to POST /feedback."""

    event_id: str


class CuratedExample(BaseModel):
    """One row of the curated dataset: a feedback event joined to its prediction, PII masked.

    `prompt` is the masked prompt text, or (`prompt_kind == "messages"`) the JSON of the masked
    messages. `*_source` is `topic/partition` and `*_offset` the Kafka offset or local-log byte position
    of the record the value came from: the dataset's lineage.
    """

    event_id: str
    request_id: str
    task: str = Field(description="The task that answered: each task's rows train only that task.")
    feedback_ts: datetime
    prediction_ts: datetime
    adapter_version: str
    prompt_kind: Literal["text", "messages"]
    prompt: str
    answer: str
    reasoning: str
    rating: int | None
    thumb: str | None
    correction: str | None
    comment: str | None
    user_id: str | None
    tenant_id: str | None
    rater: str | None = Field(None, description="Who gave the verdict (None: before identities; anonymous).")
    authenticated: bool = False
    asker: str | None = Field(None, description="Who asked for the answer.")
    feedback_source: str
    feedback_offset: int
    prediction_source: str
    prediction_offset: int
