"""The front's stand-in for rank 0's Engine: what the HTTP app calls (submit, cancel,
decode, info, metrics), carried over the socket to whichever group is up, and the
requests it keeps across a lost group. It needs no model files: rank 0 sends the text of
the tokens whose log-probabilities it reports (`pieces`), and --check-sync's last audit
with the metrics.

Each open request keeps its prompt ids (from the engine's acceptance) and every token the
client was sent. When the group is lost the requests wait; when the next group's rank 0
connects each is submitted again with `resume` = its tokens so far, and its events go on
to the same client. A request moved `migration_limit` times, or whose group is not back
within `migration_timeout` seconds, ends with one error event naming why."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from ..serving.handles import AsyncRequestHandle, EventCallback, RequestHandle
from ..serving.requests import EngineStopped, Event, Request, RequestError, Usage
from .messages import Lines, msg_to_event, msg_to_refusal, request_to_msg, send

SUBMIT_TIMEOUT_S = 60.0  # rank 0 tokenizes and answers at once; past this the group is as good as gone
METRICS_TIMEOUT_S = 2.0


@dataclass
class _Open:
    fid: int
    request: Request
    handle: RequestHandle
    prompt_ids: list[int] | None = None
    tokens: list[int] = field(default_factory=list)
    moves: int = 0
    waiting: bool = False  # its group was lost; it waits for the next one
    reply: threading.Event = field(default_factory=threading.Event)
    refusal: RequestError | None = None


class _Metrics:
    def __init__(self, remote: "RemoteEngine"):
        self.remote = remote

    def snapshot(self, recent: int = 1) -> dict:
        return self.remote.metrics_snapshot()


class RemoteEngine:
    def __init__(self, backend, migration_limit: int, migration_timeout: float):
        self.backend = backend
        self._pieces: dict[int, str] = {}  # token id -> its text, as rank 0 decoded it (at most the vocabulary)
        self.migration_limit = migration_limit
        self.migration_timeout = migration_timeout
        self.metrics = _Metrics(self)
        self.audits: list = []
        self.moved = 0  # requests moved to a new group, all told
        self._info: dict = {}
        self._sock: socket.socket | None = None
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        self._next = 1
        self._loss: str | None = None  # why the last group went, once it has
        self._t_lost = 0.0
        self._snapshot: dict = {}
        self._snap_reply = threading.Event()
        self._closed = False
        self._timer = threading.Thread(target=self._expire, name="mlx-kvshard-front-timeout", daemon=True)
        self._timer.start()

    # ---- what the HTTP app calls ---------------------------------------------------------

    @property
    def comm(self):
        return SimpleNamespace(world=self._info.get("world", 0))

    @property
    def rank_capacity(self) -> list[dict]:
        return self._info.get("ranks", [])

    @property
    def kv_capacity(self) -> int:
        return self._info.get("kv_capacity_tokens", 0)

    def info(self) -> dict:
        return self._info

    def decode(self, ids: list[int]) -> str:
        """The app decodes one token at a time (a log-probability's piece); rank 0 sent its text
        with the event that carried it."""
        return "".join(self._pieces.get(int(t), "") for t in ids)

    def submit(self, request: Request, on_event: EventCallback | None = None) -> RequestHandle:
        with self._lock:
            if self._sock is None:
                raise EngineStopped(f"not serving: {self.backend.reason}")
            fid, self._next = self._next, self._next + 1
            op = _Open(fid, request, RequestHandle(self, fid, on_event))
            self._open[fid] = op
            self._send({"t": "submit", "fid": fid, "req": request_to_msg(request)})
        if not op.reply.wait(SUBMIT_TIMEOUT_S):
            op.refusal = EngineStopped(f"rank 0 did not answer within {SUBMIT_TIMEOUT_S:g} s")
        if op.refusal is not None:
            with self._lock:
                self._open.pop(fid, None)
            raise op.refusal
        return op.handle

    def submit_async(self, request: Request) -> AsyncRequestHandle:
        return AsyncRequestHandle(self, request, asyncio.get_running_loop())

    def cancel(self, request_id: int) -> None:
        with self._lock:
            op = self._open.get(request_id)
            if op is None:
                return
            if op.waiting:  # between groups: nothing runs it, end it here
                self._end(op, Event(op.fid, "done", finish_reason="cancelled", usage=self._usage(op)))
            else:
                self._send({"t": "cancel", "fid": request_id})

    def metrics_snapshot(self) -> dict:
        with self._lock:
            if self._sock is None:
                return self._snapshot
            self._snap_reply.clear()
            self._send({"t": "metrics", "qid": 0})
        self._snap_reply.wait(METRICS_TIMEOUT_S)
        return self._snapshot

    # ---- the group's side ----------------------------------------------------------------

    def connected(self, sock: socket.socket, info: dict, lines: Lines) -> None:
        """A group's rank 0 is up: serve from it, and move every waiting request to it."""
        with self._lock:
            if self._sock is not None:  # the last group's connection never closed (the launcher says when)
                old = self._sock
                self._lose(old)
                old.close()
            self._sock, self._info, self._loss = sock, info, None
            self.audits = []
            self.backend.attach(self)
            waiting = [op for op in self._open.values() if op.waiting]
            for op in waiting:
                self._move(op)
        if waiting:
            print(f"mlx-kvshard: moved {len(waiting)} request(s) in flight to the relaunched group",
                  file=sys.stderr, flush=True)
        threading.Thread(target=self._read, args=(sock, lines), name="mlx-kvshard-front-engine", daemon=True).start()

    def detach(self) -> None:
        """The launcher saw the group end: drop its connection if it is still open."""
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # its reader sees the end and moves the requests
                except OSError:
                    pass

    def _move(self, op: _Open) -> None:
        op.waiting, op.moves = False, op.moves + 1
        self.moved += 1
        if len(op.tokens) >= op.request.params.max_tokens:  # it had every token: only the "done" was lost
            self._end(op, Event(op.fid, "done", finish_reason="length", usage=self._usage(op)))
            return
        req = Request(prompt_ids=op.prompt_ids, params=op.request.params, logprobs=op.request.logprobs,
                      top_logprobs=op.request.top_logprobs, resume=tuple(op.tokens))
        self._send({"t": "submit", "fid": op.fid, "req": request_to_msg(req)})

    def _read(self, sock: socket.socket, lines: Lines) -> None:
        while (msg := lines.next()) is not None:
            kind = msg.get("t")
            with self._lock:
                if kind == "ev":
                    self._event(msg)
                elif kind in ("accepted", "refused"):
                    self._reply(msg)
                elif kind == "metrics":
                    self._snapshot = msg.get("snapshot") or {}
                    self.audits = [msg["audit"]] if msg.get("audit") else []
                    self._snap_reply.set()
                elif kind == "lost":
                    self._loss = str(msg.get("message"))
        self._disconnected(sock)

    def _event(self, msg: dict) -> None:
        op = self._open.get(int(msg["fid"]))
        if op is None:
            return
        for t, piece in (msg.get("pieces") or {}).items():
            self._pieces[int(t)] = str(piece)
        ev = msg_to_event(op.fid, msg)
        if ev.kind == "token":
            op.tokens.append(ev.token)
        if ev.final:
            self._end(op, ev)
        else:
            op.handle._emit(ev)

    def _reply(self, msg: dict) -> None:
        op = self._open.get(int(msg["fid"]))
        if op is None:
            return
        if msg["t"] == "accepted":
            if op.prompt_ids is None:
                op.prompt_ids = [int(t) for t in msg.get("prompt_ids") or []] or None
        elif op.moves:  # the next group refused to take it on: end it with why
            self._end(op, Event(op.fid, "error", error=f"could not move the request to the relaunched group: "
                                                       f"{msg.get('message')}"))
        else:
            op.refusal = msg_to_refusal(msg)
        op.reply.set()

    def _disconnected(self, sock: socket.socket) -> None:
        with self._lock:
            if self._sock is sock:
                self._lose(sock)

    def _lose(self, sock: socket.socket) -> None:
        """`sock`'s group is gone (under the lock): its requests wait for the next group, or
        end past the bounds."""
        assert self._sock is sock
        self._sock = None
        why = self._loss or "rank 0's engine is gone (its connection to the front closed)"
        self._loss, self._t_lost = why, time.monotonic()
        if self._closed:
            return
        self.backend.state = "recovering"
        self.backend.reason = f"{why}; the requests in flight continue once the group is back"
        for op in list(self._open.values()):
            if not op.reply.is_set():  # still being submitted: refuse it (503)
                op.refusal = EngineStopped(why)
                self._open.pop(op.fid, None)
                op.reply.set()
            elif op.prompt_ids is None:
                self._end(op, Event(op.fid, "error", error=f"{why} (before the request was admitted)"))
            elif op.moves >= self.migration_limit:
                self._end(op, Event(op.fid, "error", error=f"{why}; the request was already moved "
                                                           f"{op.moves} time(s) (--migration-limit "
                                                           f"{self.migration_limit})"))
            else:
                op.waiting = True

    def _expire(self) -> None:
        while not self._closed:
            time.sleep(0.5)
            with self._lock:
                if self._sock is not None or not self._loss:
                    continue
                if time.monotonic() - self._t_lost > self.migration_timeout:
                    self._fail_waiting(f"{self._loss}; the group did not come back within "
                                       f"{self.migration_timeout:g} s (--migration-timeout)")

    def close(self, why: str) -> None:
        """The front is stopping (the launcher is done): every open request ends with `why`."""
        with self._lock:
            self._closed = True
            for op in list(self._open.values()):
                if not op.reply.is_set():
                    op.refusal = EngineStopped(why)
                    op.reply.set()
                self._end(op, Event(op.fid, "error", error=why))
            self._open.clear()

    # ---- helpers -------------------------------------------------------------------------

    def _fail_waiting(self, why: str) -> None:
        for op in [op for op in self._open.values() if op.waiting]:
            self._end(op, Event(op.fid, "error", error=why))

    def _end(self, op: _Open, ev: Event) -> None:
        self._open.pop(op.fid, None)
        op.handle._emit(ev)

    def _usage(self, op: _Open) -> Usage:
        return Usage(len(op.prompt_ids or []), len(op.tokens))

    def _send(self, msg: dict) -> None:
        if self._sock is None:
            return
        with self._send_lock:
            try:
                send(self._sock, msg)
            except OSError:
                pass  # the reader thread sees the connection go and moves the requests
