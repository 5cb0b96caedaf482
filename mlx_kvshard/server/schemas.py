"""OpenAI's request and response shapes (field names as in the OpenAI API reference), as
pydantic models: FastAPI validates every request body against them before a handler (and
so before any rank) sees it, and publishes them at /openapi.json. Strict: "5" is not a
number, true is not an integer, and no number is infinite or NaN.

The schema is the contract (tests/test_fuzz.py holds the server to it): a request it allows
is accepted, one it forbids is a 4xx. Fields OpenAI defines that change the output in ways
we do not implement are refused in `unsupported()` with a clear 400, and the schema says so
through `_only` (e.g. `n` has maximum 1). What only the loaded model bounds (the vocabulary,
the context, the model id) is added to the published schema by openapi.py. Two limits no
JSON schema can state: a prompt must fit the context in tokens, and a chat template may
refuse some conversations (the built-in ones accept every role in any order).

Extensions that vLLM and mlx_lm.server accept too: top_k, min_p, repetition_penalty.
Other unknown fields are ignored, as OpenAI does."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# What a union-typed field must be, for the error message (pydantic's lists every member).
KINDS = {"prompt": "a string, a list of one string, or a list of token ids (integers)",
         "stop": "a string or a list of strings",
         "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _only(**schema) -> dict:
    """What the schema publishes for a value `unsupported()` refuses with its own message."""
    return {"json_schema_extra": schema}


def _whole(value):
    """JSON Schema counts 298.0 as an integer; so do we (strict mode would refuse it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**bounds):
    """An integer field with these bounds (pydantic's names: ge, le, ...); true is not one."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


NonEmpty = Annotated[str, Field(min_length=1)]
TokenId = Int(ge=0)  # openapi.py adds the vocabulary's bound


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    """A chat message: its content is a string, a list of text parts, or absent (an empty
    text: e.g. an assistant turn that only called tools)."""
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Sampling(_Strict):
    """The fields both endpoints share."""
    model: str | None = None  # OpenAI requires it; we default to the one model served
    max_tokens: Int(ge=1) | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: Int(ge=-1) | None = None  # -1 or 0: off (vLLM's -1 too)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: Int() | None = None  # any integer, taken modulo 2**63 (no bound for a float-rounding client to miss)
    stop: NonEmpty | list[NonEmpty] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    n: Int(ge=1) = Field(1, **_only(maximum=1))
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, **_only(maxProperties=0))
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    # top_logprobs > 0 needs logprobs: true (OpenAI's rule)
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}})

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=20) | None = None
    tools: list[dict] | None = Field(None, **_only(maxItems=0))
    response_format: dict | None = Field(None, **_only(properties={"type": {"enum": ["text"]}}))


class CompletionRequest(_Sampling):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)] \
        | Annotated[list[TokenId], Field(min_length=1)]
    logprobs: Int(ge=0, le=20) | None = None
    echo: bool = Field(False, **_only(enum=[False]))
    suffix: str | None = Field(None, **_only(maxLength=0))
    best_of: Int(ge=1) | None = Field(None, **_only(maximum=1))


def unsupported(req: _Sampling) -> tuple[str, str] | None:
    """(field, message) for a request asking what this server does not do, else None."""
    if req.n != 1:
        return "n", f"n {req.n}: only n=1 is supported (send the request again for another completion)"
    if req.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if isinstance(req, ChatCompletionRequest):
        if req.tools:
            return "tools", "tools (function calling) are not supported"
        if req.response_format and req.response_format.get("type", "text") != "text":
            return "response_format", f"response_format {req.response_format.get('type')!r} is not supported (only text)"
        if req.top_logprobs and not req.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
    else:
        if req.echo:
            return "echo", "echo is not supported"
        if req.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if req.best_of not in (None, 1):
            return "best_of", f"best_of {req.best_of}: only 1 is supported"
    return None


# ---- responses ---------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx-kvshard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
