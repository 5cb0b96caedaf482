"""Rank 0's end of the front's socket (Unix, or TCP from another Mac): requests in, events out.

The engine runs on rank 0's main thread as always; this file's reader thread turns the
front's lines into Engine.submit/cancel calls (which validate and tokenize there, so a
bad request is refused before any rank sees it), and a writer thread sends the events,
so the engine thread never waits on the front. When the group is lost the liveness
client's before_exit says so once ("lost"): the front keeps the requests and moves
them to the next group; per-request error events are not sent then. The front has no
tokenizer: an event with log-probabilities carries the text of its tokens (`pieces`,
each id once per connection), decoded on the writer thread."""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading

from ..errors import UserError
from ..serving.requests import RequestError
from .messages import (ENV_FRONT, ENV_FRONT_TOKEN, TCP_PREFIX, Lines, event_to_msg, msg_to_request,
                       refusal_to_msg, send)

CONNECT_TIMEOUT_S = 10.0


def connect(address: str) -> socket.socket:
    """The front's socket: `tcp:HOST:PORT` (the launcher on another machine) or a Unix path."""
    try:
        if address.startswith(TCP_PREFIX):
            host, port = address[len(TCP_PREFIX):].rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small line per token
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        return sock
    except OSError as e:
        fix = ("check that this Mac reaches the launching machine at that address (a firewall there must let "
               "the launcher's Python accept connections)" if address.startswith(TCP_PREFIX)
               else "the socket lives on the launching machine")
        raise UserError(f"rank 0 cannot reach the launcher's HTTP front at {address} ({e.strerror or e}): "
                        f"{fix}") from None


def run_engine_link(engine, address: str | None = None, token: str | None = None) -> int:
    """Rank 0 under a front: serve its requests until the front or a signal stops us."""
    address = address or os.environ[ENV_FRONT]
    token = token if token is not None else os.environ.get(ENV_FRONT_TOKEN, "")
    sock = connect(address)
    link = EngineLink(engine, sock)
    send(sock, {"t": "hello", "token": token, "info": engine.info()})
    engine.on_lost = link.lost  # from the engine thread (an MLX error) or the liveness watchdog (the verdict)
    engine.live.on_shutdown = lambda why: engine.shutdown(cancel=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, _f: engine.shutdown(cancel=True))
    link.start()
    engine.run()  # on a lost peer it raises: the link stays open for the liveness verdict (link.lost)
    link.close()
    print("mlx-kvshard: the engine stopped", file=sys.stderr, flush=True)
    return 0


class EngineLink:
    def __init__(self, engine, sock: socket.socket):
        self.engine, self.sock = engine, sock
        self.out: queue.Queue[dict | None] = queue.Queue()
        self.handles: dict[int, object] = {}  # front id -> the engine's RequestHandle
        self.pieces_sent: set[int] = set()  # token ids whose text the front has (writer thread only)
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="mlx-kvshard-front-in", daemon=True)
        self._writer = threading.Thread(target=self._write, name="mlx-kvshard-front-out", daemon=True)

    def start(self) -> None:
        self._writer.start()
        self._reader.start()

    def close(self) -> None:
        self.out.put(None)
        self._writer.join(timeout=5)
        self.sock.close()

    def lost(self, message: str) -> None:
        """The group is lost and this process is ending: tell the front (the liveness verdict,
        which names the rank, may follow MLX's own error: the front keeps the last) and give
        the line a moment to go out."""
        self.sock.settimeout(1.0)  # the process ends right after: never hang on a front that stopped reading
        try:
            with self._send_lock:  # sent here and now, not queued: os._exit follows
                send(self.sock, {"t": "lost", "message": message})
        except OSError:
            pass

    def _read(self) -> None:
        lines = Lines(self.sock)
        while (msg := lines.next()) is not None:
            kind = msg.get("t")
            if kind == "submit":
                self._submit(int(msg["fid"]), msg["req"])
            elif kind == "cancel" and int(msg["fid"]) in self.handles:
                self.handles[int(msg["fid"])].cancel()
            elif kind == "metrics":  # with --check-sync, the last audit too (server/metrics.py shows it)
                audits = self.engine.audits
                self.out.put({"t": "metrics", "qid": msg.get("qid"), "snapshot": self.engine.metrics.snapshot(recent=1),
                              "audit": audits[-1] if audits else None})
        self.engine.shutdown(cancel=True)  # the front is gone: nobody is left to answer

    def _submit(self, fid: int, fields: dict) -> None:
        def on_event(ev) -> None:
            if ev.final:
                self.handles.pop(fid, None)
            self.out.put(event_to_msg(fid, ev))

        try:
            request = msg_to_request(fields)
            handle = self.engine.submit(request, on_event)
        except RequestError as e:
            self.out.put(refusal_to_msg(fid, e))
            return
        except (KeyError, TypeError, ValueError) as e:  # a malformed line: the front's bug, refused alone
            self.out.put(refusal_to_msg(fid, RequestError(f"malformed request ({type(e).__name__}: {e})")))
            return
        self.handles[fid] = handle
        self.out.put({"t": "accepted", "fid": fid, "prompt_ids": self.engine.prompt_ids(handle.id)})

    def _write(self) -> None:
        while (msg := self.out.get()) is not None:
            if msg.get("t") == "ev" and msg.get("logprob") is not None:
                self._add_pieces(msg)
            try:
                with self._send_lock:
                    send(self.sock, msg)
            except OSError:
                return

    def _add_pieces(self, msg: dict) -> None:
        ids = [msg.get("token"), *(t for t, _ in msg.get("top") or ())]
        new = [t for t in dict.fromkeys(ids) if t is not None and t not in self.pieces_sent]
        if new:
            msg["pieces"] = {str(t): self.engine.decode([t]) for t in new}
            self.pieces_sent.update(new)
