"""OpenAI's request and response shapes (field names as in the OpenAI API reference), as
pydantic models: FastAPI validates every request body against them before a handler (and
so before any rank) sees it. Strict: "5" is not a number and true is not an integer.

Extensions that vLLM and mlx_lm.server accept too: top_k, min_p, repetition_penalty.
Fields OpenAI defines that change the output in ways we do not implement are refused
with a clear 400 in `unsupported()`; other unknown fields are ignored, as OpenAI does."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# What a union-typed field must be, for the error message (pydantic's lists every member).
KINDS = {"prompt": "a string, a list of one string, or a list of token ids (integers)",
         "stop": "a string or a list of strings",
         "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class _Sampling(_Strict):
    """The fields both endpoints share."""
    model: str | None = None  # OpenAI requires it; we default to the one model served
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM's -1 too)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    response_format: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


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
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                return f"messages.{i}.content", "only text content parts are supported"
    else:
        if req.echo:
            return "echo", "echo is not supported"
        if req.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if req.best_of not in (None, 1):
            return "best_of", f"best_of {req.best_of}: only 1 is supported"
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) and len(req.prompt) != 1:
            return "prompt", f"a list of {len(req.prompt)} prompts: send one prompt per request"
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
