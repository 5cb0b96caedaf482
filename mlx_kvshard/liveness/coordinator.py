"""The coordinator: the supervising end of every rank's side channel (see liveness.py).

It runs in the launcher process, which sees every rank in simulation and on a cluster
and outlives any of them; a rank only needs its address (MLX_KVSHARD_COORDINATOR).
It lets the ranks join the MLX group once all have started, and names the first rank
that dies (its connection closes), stops answering (no heartbeat for `peer_timeout`),
fails, or holds a token up past `step_timeout`. Then it tells every rank to stop, with
one line naming the rank, its host and the token index, which every rank prints.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from .client import (DEFAULT_PEER_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S, ENV_COORDINATOR, EXIT_PEER_LOST,
                       JOIN_TIMEOUT_S, where)

TICK_S = 0.2
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
                 on_failure: Callable[[Failure], None] | None = None, join_timeout: float = JOIN_TIMEOUT_S):
        self.world = world
        self.peer_timeout = peer_timeout
        self.step_timeout = step_timeout
        self.join_timeout = join_timeout
        self.hosts = hosts
        self.out = out if out is not None else sys.stderr
        self.on_failure = on_failure
        self.failure: Failure | None = None
        self.checkpoint: tuple[str, int] | None = None  # (path, tokens) of the last one rank 0 wrote
        self.finished: set[int] = set()
        self._ranks: dict[int, _Rank] = {}
        self._bufs: dict[socket.socket, bytes] = {}
        self._who: dict[socket.socket, int] = {}
        self._sel = selectors.DefaultSelector()
        self._listen = socket.create_server((bind, 0))
        self._listen.setblocking(False)
        self._sel.register(self._listen, selectors.EVENT_READ)
        self.address = f"{advertise or bind}:{self._listen.getsockname()[1]}"
        self._t_start = time.monotonic()
        self._t_go: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlx-kvshard-coordinator", daemon=True)

    def env(self) -> dict[str, str]:
        return {ENV_COORDINATOR: self.address}

    def start(self) -> "Coordinator":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()

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
                else:
                    self._read(key.fileobj)
            if self.failure is None:
                self._check_deadlines(time.monotonic())

    def _accept(self) -> None:
        try:
            conn, _ = self._listen.accept()
        except OSError:
            return
        conn.setblocking(False)
        self._bufs[conn] = b""
        self._sel.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        r = self._who.get(conn)
        if not data:
            self._drop(conn)
            if r is not None and not self._ranks[r].done and self.failure is None:
                rk = self._ranks[r]
                self._fail(r, f"rank {r} (host {rk.host}) died {self._where(rk)} (its connection closed)")
            return
        *lines, self._bufs[conn] = (self._bufs[conn] + data).split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                self._on_message(conn, msg)

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
            elif code == EXIT_PEER_LOST and msg.get("why") and self.failure is None:
                # that rank saw a peer go (MLX's connection error, or its own step deadline) first
                self._fail(r, str(msg["why"]).split("; stopping")[0])
            # Any other code is the rank's own error (bad input, agreed by every rank at start-up,
            # or a bug): it printed why, and its peers see its connections close. Its exit code stands.

    def _hello(self, conn: socket.socket, msg: dict, now: float) -> None:
        r = msg.get("rank")
        if not isinstance(r, int) or not 0 <= r < self.world or r in self._ranks:
            self._drop(conn)  # not one of ours, or a duplicate: ignore it
            return
        try:
            peer_ip = conn.getpeername()[0]
        except OSError:
            peer_ip = "?"
        host = (self.hosts[r] if self.hosts else None) or msg.get("host") or peer_ip
        self._who[conn] = r
        self._ranks[r] = _Rank(r, host, msg.get("pid"), conn, now, t_phase=now, t_tokens=now)
        if self.failure is not None:
            self._send(conn, {"t": "stop", "message": self.failure.message})
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
        r = self._who.pop(conn, None)
        if r is not None:
            self._ranks[r].conn = None


def local_address_towards(ip: str) -> str:
    """This machine's address on the route to `ip`, for ranks to reach the coordinator
    (a UDP connect picks the route and sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))
        return s.getsockname()[0]
