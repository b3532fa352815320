"""Request and response types of the HTTP API, and the completion the LLM deployment returns."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from feedback.schemas import EventId, refuse_nulls
from flywheel.canary import CanaryReview
from flywheel.jsontypes import PositiveInt, Seed
from flywheel.registry import AdapterIntegrityError, UnknownTaskError, VersionNotFoundError
from flywheel.tasks import TaskName, VersionName
from services.adapters import AdaptersBusyError, PinnedAdaptersBusyError
from services.engines.protocol import ChatMessage, Generation, PromptTooLongError

# What a replica refuses because of the request (the caller's 4xx) or for want of room right now (503), by
# the kind it travels as.
REFUSED: dict[type[Exception], str] = {
    PromptTooLongError: "prompt_too_long", UnknownTaskError: "unknown_task",
    VersionNotFoundError: "unknown_version", AdapterIntegrityError: "unservable_version",
    PinnedAdaptersBusyError: "pinned_adapters_busy", AdaptersBusyError: "adapters_busy",
}


class Refusal(BaseModel):
    """A request an LLM replica will not run, returned rather than raised: a raised error is logged by
    Serve with its whole traceback, which a hostile client could have written once per request."""

    kind: Literal["prompt_too_long", "unknown_task", "unknown_version", "unservable_version", "pinned_adapters_busy",
                  "adapters_busy"]
    message: str

    @classmethod
    def of(cls, exc: Exception) -> Refusal:
        return cls(kind=next(kind for error, kind in REFUSED.items() if isinstance(exc, error)),  # type: ignore[arg-type]
                   message=str(exc))

    def error(self) -> Exception:
        """The exception the caller handles, as if the replica had raised it."""
        return next(error for error, kind in REFUSED.items() if kind == self.kind)(self.message)


def client_message(exc: BaseException) -> str:
    """What a client may read of an error a replica raised: its own sentence, never Ray's traceback.

    Ray re-raises a replica's exception as a subclass of both RayTaskError and the original type, whose
    text is the whole remote traceback (pids, actor ids, paths); the original is kept as `cause`.
    """
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc).strip().splitlines()[-1]


NOT_BLANK = r"[^ \t\r\n]"


class Message(ChatMessage):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class PredictRequest(BaseModel):
    """`prompt` or `messages`, not both. Limits on sizes are checked by the gateway against config."""

    # The cross-field rule, where JSON Schema can say it (clients and fuzzers read the document)
    # strict: a JSON `false` is not a temperature, nor "5" a token count (the document says their types)
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    # constraints sit on the non-null branch: the document shows optional fields, never `null`
    # "blank" is spelled as a pattern (ASCII spaces only) so the document and the check agree exactly:
    # Python's str.isspace() also counts control characters a JSON Schema `\s` does not
    prompt: Annotated[str, Field(min_length=1, pattern=NOT_BLANK)] | SkipJsonSchema[None] = Field(
        None, description="A single user turn; not only spaces.")
    messages: Annotated[list[Message], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        None, description="A chat, oldest first.")
    max_tokens: PositiveInt | None = Field(None, description="Tokens to generate; default: the task's budget.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    task: TaskName | None = Field(None, description="Which task answers (default: the platform's default task).")
    version: VersionName | SkipJsonSchema[None] = Field(
        None, description="A version of the task to answer with instead of its champion (e.g. to replay an "
        "evaluation); loaded on demand.")
    stream: bool = Field(False, description="Server-sent events as the model makes tokens (see the 200 answer).")
    user: Annotated[str, Field(min_length=1, max_length=256)] | SkipJsonSchema[None] = Field(
        None, description="Who is asking (any stable id). While a task runs a canary, its share of traffic is "
        "drawn per user: one user sees one version.")

    @model_validator(mode="before")
    @classmethod
    def _no_explicit_nulls(cls, data: object) -> object:
        return refuse_nulls(data, ("prompt", "messages", "version", "user"))

    @model_validator(mode="after")
    def _one_input(self) -> PredictRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def chat(self) -> list[ChatMessage]:
        if self.prompt is not None:
            return [ChatMessage(role="user", content=self.prompt)]
        return [ChatMessage(role=m.role, content=m.content) for m in self.messages or []]

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.chat())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Completion(BaseModel):
    """What one LLM replica returns for one request."""

    task: str
    adapter_version: str
    replica: str
    answer: str
    reasoning: str
    truncated: bool = False
    usage: Usage
    finish_reason: str | None = None


class ReplicaGeneration(Generation):
    """The engine's raw generation for one of the gate's scoring requests, and which replica made it."""

    replica: str


class StreamEvent(BaseModel):
    """One step of a streamed answer from an LLM replica: new reasoning and answer text; totals when done."""

    task: str = ""
    adapter_version: str = ""
    replica: str = ""
    reasoning: str = ""
    answer: str = ""
    refusal: Refusal | None = Field(None, description="The request was refused: the only event of the stream.")
    done: bool = False
    truncated: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None


class PredictResponse(BaseModel):
    request_id: str
    task: str
    adapter_version: str
    answer: str
    reasoning: str
    truncated: bool = Field(
        False, description="The answer budget ran out while the model was still thinking: `answer` is empty."
    )
    finish_reason: str | None = None
    usage: Usage
    latency_ms: float


class TaskHealth(BaseModel):
    champion: str | None
    serving: list[str] = Field(description="Versions of this task the live replicas serve.")


class ErrorItem(BaseModel):
    field: str
    message: str
    type: str


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx outside /v1: one sentence for people, the details per field for code."""

    error: str
    detail: list[ErrorItem] = Field(default_factory=list)
    request_id: str | None = None


class FeedbackHealth(BaseModel):
    """The feedback plane as serving sees it; its trouble degrades feedback, never answers."""

    backend: Literal["kafka", "local"]
    connected: bool = Field(description="The gateway's producer reaches the broker (always true for the local log).")
    pending: int = Field(description="Events in the gateway's spool waiting for the broker.")
    curator: Literal["starting", "running", "waiting", "stopped"] | None = Field(
        None, description="Curation as a whole: `running` while any curator runs, `waiting` while none can "
        "reach the broker; None: no curator ever started. `flywheel feedback status` says why, curator by curator.")
    curators_running: int = Field(0, description="Curators running now (partitioned curation runs several).")


class LoopHealth(BaseModel):
    """The loop's keeper of this app (see services/loop.py)."""

    role: Literal["starting", "leading", "standby", "unreachable"] = Field(
        description="`leading`: this app runs the curator, the retrain scheduler and the canary controller; "
        "`standby`: another app's keeper on the same registry does.")
    keeper: str = Field("", description="This app's keeper.")
    leader: str | None = Field(None, description="The keeper that runs the loop on this registry now.")
    since: float = Field(0.0, description="Unix time of the last change of role.")
    parts: list[str] = Field(default_factory=list, description="The loop's parts running in this keeper.")
    epoch: int | None = Field(None, description="While leading: the lease's epoch, which fences its alias moves.")


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    champion: str | None = Field(description="The default task's champion.")
    serving: list[str] = Field(description="Versions of the default task the live replicas serve.")
    tasks: dict[str, TaskHealth] = Field(default_factory=dict, description="Every task's champion and serving.")
    engine: str
    base_model: str = Field(description="The base the replicas run: the model, or a quantized base version.")
    quantization: dict | None = Field(None, description="method, bits, group size of a quantized base.")
    replicas: list[dict] = Field(default_factory=list)
    feedback: FeedbackHealth | None = None
    loop: LoopHealth | None = Field(None, description="None: the app runs no loop (`loop.enabled: false`).")


class AliasMove(BaseModel):
    """Body of /admin/promote and /admin/rollback."""

    model_config = ConfigDict(extra="forbid")

    version: VersionName | None = Field(None, description="Version to promote (promote only).")
    task: TaskName | None = Field(None, description="Task to roll back (rollback only; default: the default task).")
    reason: str = ""
    actor: str = Field("admin-api", max_length=128)
    expected_champion: VersionName | None = Field(
        None, description="Move only if this is still the champion (compare-and-swap; 409 if it changed). "
        "Absent: move whatever the champion is.")


class CanaryState(BaseModel):
    """GET /admin/canary and its promote/abort: the task's canary review (None: it runs no canary)."""

    task: str
    review: CanaryReview | None


class AdminStatus(BaseModel):
    """GET /admin/status: the default task's champion, every replica's state, the latest retrains."""

    champion: str | None
    replicas: list[dict]
    runs: list[dict]


class ReviewDecision(BaseModel):
    """Body of POST /admin/feedback/review."""

    model_config = ConfigDict(extra="forbid")

    approve: list[EventId] = Field(default_factory=list, max_length=10_000)
    reject: list[EventId] = Field(default_factory=list, max_length=10_000)
    reason: str = Field("", max_length=2000)


class ReviewResult(BaseModel):
    approved: list[str]
    rejected: list[str]
    unknown: list[str] = Field(description="Ids that name no curated feedback.")
