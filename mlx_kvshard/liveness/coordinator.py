"""The coordinator: the supervising end of every rank's side channel (see liveness.py).

It runs in the launcher process, which sees every rank in simulation and on a cluster
and outlives any of them; a rank only needs its address (MLX_KVSHARD_COORDINATOR).
It lets the ranks join the MLX group once all have started, and names the first rank
that dies (its connection closes), stops answering (no heartbeat for `peer_timeout`),
fails, or holds a token up past `step_timeout`. Then it tells every rank to stop, with
one line naming the rank, its host and the token index, which every rank prints.

Only our own ranks may join: each launch makes a random token, handed to the ranks as
MLX_KVSHARD_TOKEN (on their stdin, never on a command line: launch/secrets.py), which a
`hello` must carry (compared in constant time). Anything else that connects (a port scan, a stale rank of another launch, a
hostile process) is a stranger: it is dropped and counted, and cannot take a rank's slot.
Every per-connection buffer is bounded, and a connection that says nothing useful within
HELLO_TIMEOUT_S is dropped, so no peer can grow the launcher's memory.

A stop on request (SIGTERM or Ctrl-C to the launcher, `request_stop`) is not a failure:
every rank is told to stop in order, and connections closing after it are expected.
"""

from __future__ import annotations

import json
import secrets
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from .client import (DEFAULT_PEER_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S, ENV_COORDINATOR, ENV_TOKEN, EXIT_PEER_LOST,
                     JOIN_TIMEOUT_S, is_hello, where)

TICK_S = 0.2
# Bounds on what one connection can make us hold. A rank's lines are a few dozen bytes
# (a checkpoint path is the longest); a hello is one short line.
MAX_LINE = 64 << 10  # bytes of one line from a rank that has joined
MAX_HELLO = 4 << 10  # bytes before the first newline of a connection that has not
HELLO_TIMEOUT_S = 10.0  # a connection that has not said a valid hello by then is dropped
MAX_PENDING = 64  # connections at once that have not said hello; more are closed on accept
# Before prefill a rank imports, tokenizes and loads; on a busy machine that starves the
# heartbeat thread of the GIL for seconds (measured: up to 7 s at load 15 on 2 cores).
# A death there still shows at once (its connection closes); only silence waits longer.
STARTUP_SLACK = 3


@dataclass
class Failure:
    rank: int | None  # None: no single rank to blame (every rank alive, the ring stalled)
    host: str | None
    tokens: int
    message: str  # the one line every rank and the launcher print
    at: float  # time.monotonic() when it was detected


@dataclass
class _Rank:
    rank: int
    host: str
    pid: int | None
    conn: socket.socket | None
    last_seen: float
    phase: str = "starting"
    t_phase: float = 0.0
    tokens: int = 0
    t_tokens: float = 0.0
    done: bool = False


class Coordinator:
    def __init__(self, world: int, peer_timeout: float = DEFAULT_PEER_TIMEOUT_S,
                 step_timeout: float = DEFAULT_STEP_TIMEOUT_S, hosts: list[str] | None = None,
                 bind: str = "127.0.0.1", advertise: str | None = None, out: TextIO | None = None,
                 on_failure: Callable[[Failure], None] | None = None, join_timeout: float = JOIN_TIMEOUT_S,
                 token: str | None = None):
        self.world = world
        self.token = token or secrets.token_urlsafe(24)
        self.peer_timeout = peer_timeout
        self.step_timeout = step_timeout
        self.join_timeout = join_timeout
        self.hosts = hosts
        self.out = out if out is not None else sys.stderr
        self.on_failure = on_failure
        self.failure: Failure | None = None
        self.checkpoint: tuple[str, int] | None = None  # (path, tokens) of the last one rank 0 wrote
        self.finished: set[int] = set()
        self.strangers = 0  # connections dropped: no valid hello (wrong or no token, junk, silence, overflow)
        self.stop_requested: str | None = None  # "stopping on request (why)", once request_stop was called
        self._stop_code = 0
        self._ranks: dict[int, _Rank] = {}
        self._bufs: dict[socket.socket, bytes] = {}
        self._who: dict[socket.socket, int] = {}
        self._pending: dict[socket.socket, tuple[float, str]] = {}  # not yet said hello: (accepted at, peer ip)
        self._sel = selectors.DefaultSelector()
        self._listen = socket.create_server((bind, 0))
        self._listen.setblocking(False)
        self._sel.register(self._listen, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()  # request_stop reaches the loop's thread through it
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self.address = f"{advertise or bind}:{self._listen.getsockname()[1]}"
        self._t_start = time.monotonic()
        self._t_go: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlx-kvshard-coordinator", daemon=True)

    def env(self) -> dict[str, str]:
        """What every rank needs in its environment: where we are, and the launch's token."""
        return {ENV_COORDINATOR: self.address, ENV_TOKEN: self.token}

    def request_stop(self, why: str, code: int = 0) -> None:
        """An orderly stop asked for by the operator (thread-safe), e.g. why = "SIGTERM":
        every rank is told to stop (a rank with no orderly way exits `code`), and from now
        on a rank that leaves is not a failure."""
        self._stop_code = code
        self.stop_requested = f"stopping on request ({why})"
        self._wake_w.send(b"x")

    def start(self) -> "Coordinator":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if self.strangers:
            print(f"mlx-kvshard: {self.strangers} connection(s) to the coordinator were dropped: not this "
                  f"launch's ranks", file=self.out, flush=True)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()
        self._wake_w.close()

    def __enter__(self) -> "Coordinator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=TICK_S):
                if key.fileobj is self._listen:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._on_stop_request()
                else:
                    self._read(key.fileobj)
            now = time.monotonic()
            self._drop_silent(now)
            if self.failure is None and self.stop_requested is None:
                self._check_deadlines(now)

    def _on_stop_request(self) -> None:
        try:
            self._wake_r.recv(4096)
        except OSError:
            pass
        print(f"mlx-kvshard: {self.stop_requested}: telling every rank to stop", file=self.out, flush=True)
        for rk in self._ranks.values():
            if rk.conn is not None and not rk.done:
                self._send(rk.conn, self._shutdown_message())

    def _shutdown_message(self) -> dict:
        return {"t": "shutdown", "message": self.stop_requested, "code": self._stop_code}

    def _accept(self) -> None:
        try:
            conn, peer = self._listen.accept()
        except OSError:
            return
        if len(self._pending) >= MAX_PENDING:
            conn.close()
            self._stranger(peer[0], "too many connections that have not said hello")
            return
        conn.setblocking(False)
        self._bufs[conn] = b""
        self._pending[conn] = (time.monotonic(), peer[0])
        self._sel.register(conn, selectors.EVENT_READ)

    def _drop_silent(self, now: float) -> None:
        for conn, (t, ip) in list(self._pending.items()):
            if now - t > HELLO_TIMEOUT_S:
                self._drop(conn)
                self._stranger(ip, f"no hello within {HELLO_TIMEOUT_S:g} s")

    def _stranger(self, ip: str, why: str) -> None:
        """Count a dropped connection; say so for the first and then every tenfold more,
        so a scan cannot flood the launcher's log."""
        self.strangers += 1
        n = self.strangers
        if n == 10 ** (len(str(n)) - 1):
            print(f"mlx-kvshard: dropped a connection to the coordinator from {ip} ({why}): not one of this "
                  f"launch's ranks ({n} so far). Keep the cluster network private.", file=self.out, flush=True)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        r = self._who.get(conn)
        if not data:
            pending = self._pending.get(conn)
            self._drop(conn)
            if pending is not None:
                self._stranger(pending[1], "closed without a hello")
            elif r is not None and not self._ranks[r].done and self.failure is None and self.stop_requested is None:
                rk = self._ranks[r]
                self._fail(r, f"rank {r} (host {rk.host}) died {self._where(rk)} (its connection closed)")
            return
        *lines, rest = (self._bufs[conn] + data).split(b"\n")
        if conn in self._pending:
            self._first_line(conn, lines, rest)
            return
        if len(rest) > MAX_LINE:  # our own rank, misbehaving: as if it had died
            self._drop(conn)
            if self.failure is None and self.stop_requested is None:
                rk = self._ranks[r]
                self._fail(r, f"rank {r} (host {rk.host}) sent a line longer than {MAX_LINE} bytes on the "
                              f"side channel {self._where(rk)}")
            return
        self._bufs[conn] = rest
        for line in lines:
            msg = _parse(line)
            if msg is not None:
                self._on_message(conn, msg)
            if conn not in self._bufs:  # dropped while handling a line
                return

    def _first_line(self, conn: socket.socket, lines: list[bytes], rest: bytes) -> None:
        """A connection's first line must be a hello with this launch's token."""
        ip = self._pending[conn][1]
        if not lines:
            if len(rest) > MAX_HELLO:
                self._drop(conn)
                self._stranger(ip, f"more than {MAX_HELLO} bytes without a newline")
            else:
                self._bufs[conn] = rest
            return
        msg = _parse(lines[0])
        if not is_hello(msg, self.token):
            self._drop(conn)
            self._stranger(ip, "no hello with this launch's token" if msg is None or msg.get("t") != "hello"
                           else "a hello without this launch's token")
            return
        del self._pending[conn]
        self._bufs[conn] = b""
        self._hello(conn, msg, time.monotonic())
        if conn not in self._who:
            return  # refused (a duplicate or out-of-range rank)
        # anything sent after the hello in the same read: as if it came in a later read
        self._bufs[conn] = b"\n".join([*lines[1:], rest])
        if lines[1:]:
            self._read_buffered(conn)

    def _read_buffered(self, conn: socket.socket) -> None:
        *lines, self._bufs[conn] = self._bufs[conn].split(b"\n")
        for line in lines:
            msg = _parse(line)
            if msg is not None:
                self._on_message(conn, msg)
            if conn not in self._bufs:
                return

    def _on_message(self, conn: socket.socket, msg: dict) -> None:
        now = time.monotonic()
        kind = msg.get("t")
        if kind == "hello":
            self._hello(conn, msg, now)
            return
        r = self._who.get(conn)
        if r is None:
            return
        rk = self._ranks[r]
        rk.last_seen = now
        if kind == "s":
            rk.tokens, rk.t_tokens = int(msg.get("n", rk.tokens)), now
            if rk.phase != "decode":
                rk.phase, rk.t_phase = "decode", now
        elif kind == "phase":
            rk.phase, rk.t_phase, rk.t_tokens = str(msg.get("phase")), now, now
        elif kind == "wake":  # a serving engine's rank 0 leaves idle: forward to every rank
            for other in self._ranks.values():
                if other.conn is not None and not other.done:
                    self._send(other.conn, {"t": "wake"})
        elif kind == "ckpt":
            self.checkpoint = (str(msg.get("path")), int(msg.get("n", 0)))
        elif kind == "bye":
            code = int(msg.get("code", 0))
            rk.done = True
            if code == 0:
                self.finished.add(r)
            elif code == EXIT_PEER_LOST and msg.get("why") and self.failure is None and self.stop_requested is None:
                # that rank saw a peer go (MLX's connection error, or its own step deadline) first
                self._fail(r, str(msg["why"]).split("; stopping")[0])
            # Any other code is the rank's own error (bad input, agreed by every rank at start-up,
            # or a bug): it printed why, and its peers see its connections close. Its exit code stands.

    def _hello(self, conn: socket.socket, msg: dict, now: float) -> None:
        r = msg.get("rank")
        try:
            peer_ip = conn.getpeername()[0]
        except OSError:
            peer_ip = "?"
        if not isinstance(r, int) or not 0 <= r < self.world or r in self._ranks:
            self._drop(conn)  # it holds the token (one of ours started twice?), but the slot is not free
            taken = isinstance(r, int) and r in self._ranks
            self._stranger(peer_ip, f"a hello for rank {str(r)[:20]}, which " +
                           ("has already joined" if taken else f"is not in a world of {self.world}"))
            return
        host = (self.hosts[r] if self.hosts else None) or msg.get("host") or peer_ip
        self._who[conn] = r
        self._ranks[r] = _Rank(r, host, msg.get("pid"), conn, now, t_phase=now, t_tokens=now)
        if self.failure is not None:
            self._send(conn, {"t": "stop", "message": self.failure.message})
        elif self.stop_requested is not None:
            self._send(conn, self._shutdown_message())
        elif len(self._ranks) == self.world:
            self._t_go = now
            for rk in self._ranks.values():
                self._send(rk.conn, {"t": "go"})

    def _check_deadlines(self, now: float) -> None:
        if self._t_go is None:
            if now - self._t_start > self.join_timeout:
                missing = [r for r in range(self.world) if r not in self._ranks]
                r = missing[0]
                self._fail(r, f"rank {r} (host {self._host(r)}) did not start within {self.join_timeout:g} s")
            return
        live = [rk for rk in self._ranks.values() if not rk.done]
        for rk in live:
            if rk.phase == "joining":  # mx.distributed.init holds the GIL: no heartbeats until it returns
                if now - rk.t_phase > self.join_timeout:
                    self._fail(rk.rank, f"rank {rk.rank} (host {rk.host}) did not join the group "
                                        f"within {self.join_timeout:g} s")
                    return
            elif now - rk.last_seen > self.peer_timeout * (STARTUP_SLACK if rk.phase == "loading" else 1):
                self._fail(rk.rank, f"rank {rk.rank} (host {rk.host}) stopped responding {self._where(rk)} "
                                    f"(no heartbeat for {now - rk.last_seen:.1f} s)")
                return
        decoding = [rk for rk in live if rk.phase == "decode"]
        late = [rk for rk in decoding if now - rk.t_tokens > self.step_timeout]
        if late:
            behind = min(rk.tokens for rk in decoding)
            laggards = [rk for rk in decoding if rk.tokens == behind]
            if len(laggards) < len(decoding):
                rk = laggards[0]
                self._fail(rk.rank, f"rank {rk.rank} (host {rk.host}) did not finish token {behind} "
                                    f"within {self.step_timeout:g} s")
            else:
                self._fail(None, f"token {behind} did not finish within {self.step_timeout:g} s on any rank "
                                 f"(every rank alive: a link between them stalled)")

    # ---- verdict ----------------------------------------------------------------------

    def _fail(self, r: int | None, what: str) -> None:
        tokens = max((rk.tokens for rk in self._ranks.values()), default=0)
        resume = ""
        if self.checkpoint:
            path, n = self.checkpoint
            resume = f" Resume with --resume {path} ({n} tokens saved)."
        message = f"mlx-kvshard: {what}; stopping all ranks.{resume}"
        self.failure = Failure(r, self._host(r) if r is not None else None, tokens, message, time.monotonic())
        print(message, file=self.out, flush=True)
        for rk in self._ranks.values():
            if rk.conn is not None and not rk.done:
                self._send(rk.conn, {"t": "stop", "message": message})
        if self.on_failure:
            self.on_failure(self.failure)

    def _where(self, rk: _Rank) -> str:
        # The cluster works on one token at a time: the furthest report is the token in flight.
        decoding = any(k.phase == "decode" for k in self._ranks.values())
        return where(max(k.tokens for k in self._ranks.values()), "decode" if decoding else rk.phase)

    def _host(self, r: int) -> str:
        if r in self._ranks:
            return self._ranks[r].host
        return self.hosts[r] if self.hosts else "?"

    def _send(self, conn: socket.socket, msg: dict) -> None:
        try:
            conn.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        except OSError:
            pass  # that rank is gone or going; the verdict reaches the others

    def _drop(self, conn: socket.socket) -> None:
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()
        self._bufs.pop(conn, None)
        self._pending.pop(conn, None)
        r = self._who.pop(conn, None)
        if r is not None:
            self._ranks[r].conn = None


def _parse(line: bytes) -> dict | None:
    try:
        msg = json.loads(line)
    except ValueError:  # bytes that are not UTF-8 raise UnicodeDecodeError, a ValueError
        return None
    return msg if isinstance(msg, dict) else None


def local_address_towards(ip: str) -> str:
    """This machine's address on the route to `ip`, for ranks to reach the coordinator
    (a UDP connect picks the route and sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))
        return s.getsockname()[0]
