"""What callers hand the engine and what they get back (plain data, no MLX)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.generate import SamplingParams
from ..errors import UserError


class RequestError(UserError):
    """The request is refused before any rank sees it (a bad parameter, a prompt past the
    context, one that can never fit the KV cache, a tokenizer error): HTTP 400. `param`
    names the request field at fault in OpenAI's words ("prompt" also stands for a chat's
    messages); `code` is OpenAI's error code where one fits."""
    exit_code = 2

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFull(RequestError):
    """The waiting queue is at --max-waiting: try again later (HTTP 429)."""


class EngineStopped(RequestError):
    """The engine is shutting down or stopped: HTTP 503."""


@dataclass(frozen=True)
class Request:
    """One generation. Give exactly one of `prompt` (text), `messages` (a chat, the chat
    template applied) or `prompt_ids` (token ids, used as they are)."""
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    chat_template: bool = False  # apply the chat template to a text `prompt` (as `generate` does)
    logprobs: bool = False  # report each token's log-probability
    top_logprobs: int = 0  # and this many alternatives (at most 20)
    tag: object = None  # the caller's own, carried back in every event (e.g. the input line)
    # Tokens this request already generated (and its client already received) before the
    # group that ran it was lost: prefilled after the prompt (prompt_ids only), then
    # generation continues at token index len(resume) with the same sampling key, so the
    # whole output equals an undisturbed run's. Their text and events are not sent again.
    resume: tuple[int, ...] = ()

    @property
    def reported_logprobs(self) -> int | None:
        """What the sampler computes for it: None = no log-probabilities, else how many
        alternatives beside the token's own."""
        return self.top_logprobs if self.logprobs or self.top_logprobs else None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class Event:
    """One thing that happened to a request. `kind` is "token" (one generated token and
    the text it completes, possibly ""), "done" (the last event: finish_reason "stop",
    "length" or "cancelled", the usage and any text held back until the end) or "error"
    (the last event: the engine stopped, e.g. a rank was lost, with `code` None; or this
    request alone failed, `code` "request_failed", and the engine goes on)."""
    request_id: int
    kind: str
    token: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    code: str | None = None
    tag: object = None

    @property
    def final(self) -> bool:
        return self.kind in ("done", "error")


@dataclass
class Completion:
    """A finished request, as `RequestHandle.result()` collects it."""
    request_id: int
    text: str
    tokens: list[int]
    finish_reason: str | None
    usage: Usage | None
    error: str | None = None
