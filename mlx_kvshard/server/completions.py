"""One OpenAI request through the engine: map the validated body to an engine `Request`,
submit it (the engine tokenizes and refuses what cannot run before any rank sees it),
then answer with one JSON object or a stream of Server-Sent Events.

Events flow engine thread -> `loop.call_soon_threadsafe` -> this request's asyncio queue
(`Engine.submit_async`) -> the handler here, on uvicorn's event loop. A client that goes
away cancels its request (Starlette cancels a streaming body when the client disconnects;
a plain request watches `http.disconnect`), which frees its KV on every rank."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from typing import AsyncIterator

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.generate import SamplingParams
from ..liveness.client import GRACE_S
from ..serving.requests import EngineStopped, QueueFull, Request, RequestError
from . import schemas as s
from .errors import ApiError, error_body
from .metrics import ServerMetrics
from .state import Backend

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
VERDICT_WAIT_S = GRACE_S + 1.0


@dataclasses.dataclass
class Call:
    """One request's response shape and bookkeeping (chat or text completion)."""
    chat: bool
    model: str
    decode: object  # Engine.decode: token ids -> text, thread-safe
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    n_tokens: int = 0
    offset: int = 0  # characters of completion text sent so far (text_offset of the next token)

    def __post_init__(self):
        self.id = s.new_id("chatcmpl" if self.chat else "cmpl")

    @property
    def endpoint(self) -> str:
        return "chat" if self.chat else "completions"

    def seen(self, event) -> None:
        if event.kind == "token":
            now = time.perf_counter()
            self.t_first = self.t_first or now
            self.t_last = now
            self.n_tokens += 1

    # ---- response objects --------------------------------------------------------------

    def chunk(self, text: str | None, lps: list, finish: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = s.Delta(role="assistant" if role else None, content=text)
            body = s.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
                s.ChatChunkChoice(delta=delta, logprobs=self._chat_logprobs(lps), finish_reason=finish)])
        else:
            body = s.Completion(id=self.id, created=self.created, model=self.model, choices=[
                s.TextChoice(text=text or "", logprobs=self._text_logprobs(lps), finish_reason=finish)])
        return sse(body.model_dump_json(exclude_none=True))

    def usage_chunk(self, usage) -> str:
        cls = s.ChatCompletionChunk if self.chat else s.Completion
        return sse(cls(id=self.id, created=self.created, model=self.model, choices=[],
                       usage=to_usage(usage)).model_dump_json())

    def whole(self, text: str, lps: list, finish: str, usage) -> dict:
        if self.chat:
            choice = s.ChatChoice(message=s.ChatMessage(content=text), logprobs=self._chat_logprobs(lps),
                                  finish_reason=finish)
            return s.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                                    usage=to_usage(usage)).model_dump()
        choice = s.TextChoice(text=text, logprobs=self._text_logprobs(lps), finish_reason=finish)
        return s.Completion(id=self.id, created=self.created, model=self.model, choices=[choice],
                            usage=to_usage(usage)).model_dump()

    def _piece(self, token: int) -> str:
        return self.decode([token])

    def _chat_logprobs(self, lps: list) -> s.ChatLogprobs | None:
        if not self.logprobs or not lps:
            return None
        content = []
        for token, lp, alts in lps:
            piece = self._piece(token)
            top = [s.TopLogprob(token=(a := self._piece(t)), logprob=v, bytes=list(a.encode())) for t, v in alts or []]
            content.append(s.TokenLogprob(token=piece, logprob=lp, bytes=list(piece.encode()), top_logprobs=top))
        return s.ChatLogprobs(content=content)

    def _text_logprobs(self, lps: list) -> s.CompletionLogprobs | None:
        if not self.logprobs or not lps:
            return None
        pieces = [self._piece(t) for t, _, _ in lps]
        offsets = []
        for p in pieces:
            offsets.append(self.offset)
            self.offset += len(p)
        top = [{self._piece(t): v for t, v in alts or []} for _, _, alts in lps] if self.top_logprobs else None
        return s.CompletionLogprobs(tokens=pieces, token_logprobs=[lp for _, lp, _ in lps], top_logprobs=top,
                                    text_offset=offsets)


def sse(data: str) -> str:
    return f"data: {data}\n\n"


def to_usage(u) -> s.Usage:
    return s.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                   total_tokens=u.prompt_tokens + u.completion_tokens,
                   prompt_tokens_details=s.PromptTokensDetails(cached_tokens=u.cached_tokens))


# ---- request -> engine -----------------------------------------------------------------------

def engine_request(req: s.ChatCompletionRequest | s.CompletionRequest, default_max_tokens: int) -> Request:
    """The engine's request for a validated body. No seed: a fresh one, so two sampled
    requests differ (the engine keys randomness by seed and token index)."""
    chat = isinstance(req, s.ChatCompletionRequest)
    max_tokens = (req.max_completion_tokens if chat else None) or req.max_tokens or default_max_tokens
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(not x for x in stop):
        raise ApiError(400, "stop: stop strings must not be empty", param="stop")
    params = SamplingParams(
        max_tokens=max_tokens, temp=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p or 0.0, top_k=max(0, req.top_k or 0), min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty, seed=secrets.randbits(62) if req.seed is None else req.seed % 2**63,
        stop=stop, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
    if chat:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        return Request(messages=messages, params=params, logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0)
    prompt = req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) \
        else req.prompt
    if isinstance(prompt, list):
        return Request(prompt_ids=prompt, params=params, logprobs=req.logprobs is not None,
                       top_logprobs=req.logprobs or 0)
    return Request(prompt=prompt, params=params, logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0)


def refusal(e: RequestError, prompt_field: str) -> ApiError:
    """The engine's refusal (it speaks OpenAI's field names) as an HTTP error."""
    msg = str(e)
    if isinstance(e, QueueFull):
        return ApiError(429, msg, code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineStopped):
        return ApiError(503, msg, code="unavailable")
    return ApiError(400, msg, param=prompt_field if e.param == "prompt" else e.param, code=e.code)


# ---- answering -------------------------------------------------------------------------------

async def complete(http: HttpRequest, req, backend: Backend, metrics: ServerMetrics, model_id: str,
                   default_max_tokens: int):
    chat = isinstance(req, s.ChatCompletionRequest)
    call = Call(chat, model_id, backend.engine.decode if backend.engine else None,
                logprobs=req.logprobs if chat else req.logprobs is not None,
                top_logprobs=(req.top_logprobs or 0) if chat else (req.logprobs or 0),
                include_usage=bool(req.stream_options and req.stream_options.include_usage))
    try:
        check(req, backend, model_id)
        handle = backend.engine.submit_async(engine_request(req, default_max_tokens))
    except RequestError as e:
        err = refusal(e, "messages" if chat else "prompt")
        metrics.refused(call.endpoint, {429: "queue_full", 503: "unavailable"}.get(err.status, "invalid"))
        raise err from None
    except ApiError as e:
        metrics.refused(call.endpoint, "unavailable" if e.status == 503 else "invalid")
        raise
    if req.stream:
        return StreamingResponse(stream(handle, call, backend, metrics), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    backend.opened()
    try:
        return await collect(http, handle, call, backend, metrics)
    finally:
        backend.closed()


def check(req, backend: Backend, model_id: str) -> None:
    if req.model is not None and req.model != model_id:
        raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{model_id}` "
                            f"(GET /v1/models)", param="model", code="model_not_found")
    why = s.unsupported(req)
    if why:
        raise ApiError(400, why[1], param=why[0], code="unsupported_parameter")
    if not backend.ready:
        raise ApiError(503, f"not serving: {backend.reason}", code="unavailable")


async def stream(handle, call: Call, backend: Backend, metrics: ServerMetrics) -> AsyncIterator[str]:
    """SSE: a role chunk, one chunk per token with text (or logprobs), the finish, usage if
    asked, [DONE]. An engine error ends it with an error event (the openai client raises it)."""
    outcome, usage = "cancelled", None
    backend.opened()
    try:
        if call.chat:
            yield call.chunk("", [], role=True)
        async for ev in handle:
            call.seen(ev)
            try:
                lps = [(ev.token, ev.logprob, ev.top_logprobs)] if ev.kind == "token" and call.logprobs else []
                if ev.kind == "token" and (ev.text or lps):
                    yield call.chunk(ev.text, lps)
                elif ev.kind == "done" and ev.finish_reason != "cancelled":
                    outcome, usage = ev.finish_reason, ev.usage
                    yield call.chunk(ev.text or None, [], finish=ev.finish_reason)
                    if call.include_usage:
                        yield call.usage_chunk(ev.usage)
                elif ev.final:  # it failed, a rank was lost, or the server is shutting down (it cancels)
                    outcome = "error"
                    yield sse(_json(error_body(**await failure(ev, backend))))
            except Exception as e:  # this response could not be written: end it alone (and its row)
                outcome = "error"
                handle.cancel()
                yield sse(_json(error_body(500, unwritable(e), code="request_failed")))
                break
        yield sse("[DONE]")
    finally:
        if outcome == "cancelled":  # the client went away mid-stream (or the loop is ending): free its KV
            handle.cancel()
        metrics.finished(call, outcome, usage)
        backend.closed()


async def collect(http: HttpRequest, handle, call: Call, backend: Backend, metrics: ServerMetrics) -> JSONResponse:
    """The whole completion; cancelled if the client disconnects before it is done."""
    async def events():
        out = []
        async for ev in handle:
            call.seen(ev)
            out.append(ev)
        return out

    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(events()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        handle.cancel()
        await work  # the engine answers a cancel with a final event at once
        metrics.finished(call, "cancelled", None)
        return JSONResponse(error_body(499, "client closed the request"), status_code=499)
    events_ = work.result()
    last = events_[-1]
    if last.kind == "error" or last.finish_reason == "cancelled":
        metrics.finished(call, "error", None)
        err = await failure(last, backend)
        raise ApiError(err["status"], err["message"], code=err["code"])
    text = "".join(ev.text for ev in events_)
    lps = [(ev.token, ev.logprob, ev.top_logprobs) for ev in events_ if ev.kind == "token"] if call.logprobs else []
    try:
        response = JSONResponse(call.whole(text, lps, last.finish_reason, last.usage))
    except Exception as e:  # this response could not be written: it fails alone
        metrics.finished(call, "error", None)
        raise ApiError(500, unwritable(e), code="request_failed") from None
    metrics.finished(call, last.finish_reason, last.usage)
    return response


def unwritable(e: Exception) -> str:
    return f"the response could not be written: {type(e).__name__}: {e}"


async def failure(ev, backend: Backend) -> dict:
    """What to tell a client whose request ended without finishing. A lost peer surfaces on
    rank 0 first as MLX's connection error, which does not say which rank; the liveness
    verdict naming it follows within a moment (GRACE_S), so wait for that (bounded)."""
    if ev.kind == "done":  # cancelled by a shutdown
        return {"status": 503, "message": "the server is shutting down; the request was cancelled",
                "code": "unavailable"}
    if ev.code == "request_failed":  # this request alone failed; the engine goes on
        return {"status": 500, "message": ev.error, "code": ev.code}
    deadline = time.monotonic() + VERDICT_WAIT_S
    while backend.state != "lost" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    message = backend.reason if backend.state == "lost" else ev.error
    return {"status": 500, "message": message or "the engine stopped", "code": "rank_lost"}


def _json(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))
