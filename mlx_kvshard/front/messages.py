"""What the front and rank 0's engine say to each other: one JSON object per line over a
Unix socket (rank 0 on the launching machine) or TCP (rank 0 on another Mac). Requests,
events and refusals as plain fields (ids, integers, floats, strings), never pickle; every
line bounded."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, fields

from ..engine.generate import SamplingParams
from ..serving.requests import EngineStopped, Event, QueueFull, Request, RequestError, Usage

ENV_FRONT = "MLX_KVSHARD_FRONT"  # where rank 0 finds the front: a Unix socket path, or tcp:HOST:PORT
ENV_FRONT_TOKEN = "MLX_KVSHARD_FRONT_TOKEN"  # the secret rank 0's hello must carry (on stdin: launch/secrets.py)
TCP_PREFIX = "tcp:"
MAX_LINE = 64 << 20  # bytes: a request carries at most the body limit's text or a context of ids
MAX_HELLO = 1 << 20  # bytes: before its token is checked a peer gets no more than this


def send(sock: socket.socket, msg: dict) -> None:
    sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")


class Lines:
    """Read whole JSON lines from a blocking socket; None at EOF (or a line longer than `limit`)."""

    def __init__(self, sock: socket.socket, limit: int = MAX_LINE):
        self.sock, self.buf, self.limit = sock, b"", limit

    def next(self) -> dict | None:
        while b"\n" not in self.buf:
            if len(self.buf) > self.limit:
                return None
            try:
                data = self.sock.recv(min(1 << 20, self.limit + 1 - len(self.buf)))
            except OSError:
                return None
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        return msg if isinstance(msg, dict) else None


def request_to_msg(req: Request) -> dict:
    return {"prompt": req.prompt, "messages": req.messages, "prompt_ids": req.prompt_ids,
            "params": {**asdict(req.params), "stop": list(req.params.stop)}, "chat_template": req.chat_template,
            "logprobs": req.logprobs, "top_logprobs": req.top_logprobs, "resume": list(req.resume)}


def msg_to_request(m: dict) -> Request:
    names = {f.name for f in fields(SamplingParams)}
    p = {k: v for k, v in m["params"].items() if k in names}
    p["stop"] = tuple(p.get("stop") or ())
    ids = m.get("prompt_ids")
    return Request(prompt=m.get("prompt"), messages=m.get("messages"),
                   prompt_ids=[int(t) for t in ids] if ids is not None else None,
                   params=SamplingParams(**p), chat_template=bool(m.get("chat_template")),
                   logprobs=bool(m.get("logprobs")), top_logprobs=int(m.get("top_logprobs", 0)),
                   resume=tuple(int(t) for t in m.get("resume") or ()))


def event_to_msg(fid: int, ev: Event) -> dict:
    msg = {"t": "ev", "fid": fid, "kind": ev.kind}
    if ev.token is not None:
        msg["token"] = ev.token
    if ev.text:
        msg["text"] = ev.text
    if ev.logprob is not None:
        msg["logprob"] = ev.logprob
    if ev.top_logprobs:
        msg["top"] = [[int(t), float(lp)] for t, lp in ev.top_logprobs]
    if ev.finish_reason is not None:
        msg["finish"] = ev.finish_reason
    if ev.usage is not None:
        msg["usage"] = [ev.usage.prompt_tokens, ev.usage.completion_tokens, ev.usage.cached_tokens]
    if ev.error is not None:
        msg["error"] = ev.error
    return msg


def msg_to_event(fid: int, m: dict) -> Event:
    usage = Usage(*m["usage"]) if m.get("usage") else None
    top = [(int(t), float(lp)) for t, lp in m["top"]] if m.get("top") else None
    return Event(fid, str(m["kind"]), m.get("token"), m.get("text", ""), m.get("logprob"), top,
                 m.get("finish"), usage, m.get("error"))


def refusal_to_msg(fid: int, e: RequestError) -> dict:
    kind = "queue_full" if isinstance(e, QueueFull) else "stopped" if isinstance(e, EngineStopped) else "invalid"
    return {"t": "refused", "fid": fid, "kind": kind, "message": str(e), "param": e.param, "code": e.code}


def msg_to_refusal(m: dict) -> RequestError:
    cls = {"queue_full": QueueFull, "stopped": EngineStopped}.get(m.get("kind"), RequestError)
    return cls(str(m.get("message")), m.get("param"), m.get("code"))
