"""The OpenAI chat-completions API as flywheel speaks it: request, response, stream chunk, model list, error.

`model` is a task name (its champion answers). Fields OpenAI clients send that flywheel does not use
(penalties, logit bias, tools, …) are ignored; those whose meaning it cannot honour are refused clearly
and their limits are in the schema (`n` is at most 1). vLLM's `min_tokens` and `ignore_eos`, which load
tools send, are honoured.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.jsontypes import NonNegativeInt, PositiveInt, Seed
from services.engines.protocol import ChatMessage


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatTurn(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts (joined).")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


StopText = Annotated[str, Field(min_length=1, max_length=200)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=200, description="A task name: its champion answers.")
    messages: list[ChatTurn] = Field(min_length=1)
    max_tokens: PositiveInt | None = Field(None, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: PositiveInt | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        None, description="Up to 4 non-empty sequences where generation stops.")
    n: int = Field(1, ge=1, le=1, description="Choices per request: flywheel answers with one (each answer is "
                   "rated through its own request id); a larger n is refused with 400, param `n`.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's extensions that load tools send for answers of a fixed length
    min_tokens: NonNegativeInt = Field(0, description="vLLM's extension: tokens made before an end of sequence or "
                                       "a stop may end the answer; at most the answer's max tokens.")
    ignore_eos: bool = Field(False, description="vLLM's extension: make max tokens whatever the model's end of "
                             "sequence says (load tests of a fixed answer length).")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def chat(self) -> list[ChatMessage]:
        # OpenAI's newer `developer` role is the system prompt for models without one of their own
        return [ChatMessage(role="system" if t.role == "developer" else t.role, content=t.text())
                for t in self.messages]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str = Field(description="The R1 thinking (vLLM's and DeepSeek's field name).")
    reasoning: str = Field(description="The same thinking, under the name other clients read.")


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str = Field(description="`chatcmpl-<request id>`; POST /feedback accepts it as the request id.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The exact adapter version that answered (e.g. `faq-v3`).")
    choices: list[Choice]
    usage: CompletionUsage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flywheel"
    parent: str | None = Field(None, description="For a task: the base model it runs on.")
    root: str | None = Field(None, description="The base model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody
