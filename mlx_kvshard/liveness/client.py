"""Rank side of liveness: a side channel to the coordinator, independent of MLX's
collectives, and this rank's own watchdog.

MLX's ring raises on a closed connection but waits forever on a stalled peer, and a
group that raised cannot be reused (DESIGN invariant 4). So every rank
- says hello and waits for every rank before joining the group (`start`),
- tells the coordinator each finished token and sends a heartbeat twice a second,
- exits with EXIT_PEER_LOST and one clear line when the coordinator says a peer is
  gone, when its own token takes too long, or when MLX reports a lost connection,
- stops in order when the coordinator passes on an operator's request (`on_shutdown`).

The hello carries the launch's token (MLX_KVSHARD_TOKEN, from the launcher): the
coordinator admits no rank without it.

Measured on MLX 0.32 (ring, CPU): `mx.eval` and `array.item()` release the GIL while a
collective waits, so a plain thread runs (and `os._exit`s) while the main thread is
blocked in one. `mx.distributed.init` holds the GIL while it connects, which is why the
ranks meet at the coordinator first and a C-level `faulthandler` timer guards init.
"""

from __future__ import annotations

import faulthandler
import hmac
import json
import os
import select
import socket
import sys
import threading
import time

from ..settings import DEFAULT_PEER_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S, HEARTBEAT_S, LivenessSettings

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: a peer died or stalled; resuming from the checkpoint can succeed
ENV_COORDINATOR = "MLX_KVSHARD_COORDINATOR"  # host:port of the coordinator, set by the launcher
ENV_HOST = "MLX_KVSHARD_HOST"  # this rank's host label for messages (else the address seen)
ENV_TOKEN = "MLX_KVSHARD_TOKEN"  # the launch's secret, which the hello must carry (set by the launcher)
MAX_LINE = 64 << 10  # bytes of one line from the coordinator; a longer one means it is not ours
GRACE_S = 2.0  # after MLX reports a lost peer, how long to wait for the coordinator to name it
JOIN_TIMEOUT_S = 120.0  # every rank said hello, and mx.distributed.init returned, within this


def is_hello(msg: dict | None, token: str) -> bool:
    """A parsed first line that is a hello carrying this launch's token (compared in constant
    time): what the coordinator and the front accept before anything else."""
    given = msg.get("token") if isinstance(msg, dict) else None
    return (isinstance(given, str) and msg.get("t") == "hello"
            and hmac.compare_digest(given.encode(), token.encode()))


def where(n: int, phase: str) -> str:
    """'at token 17', or the phase before decoding started (shared with the coordinator)."""
    if phase == "decode":
        return f"at token {n}"
    return {"starting": "while starting", "joining": "while joining the group", "loading": "while loading",
            "prefill": "during prefill", "finishing": "after the last token"}.get(phase, f"while {phase}")


class Liveness:
    """One per rank process. Cheap on the hot path: `progress` is a clock read and one
    non-blocking send of a few bytes, no collective and no host sync."""

    def __init__(self, rank: int, step_timeout: float, coordinator: str | None = None,
                 peer_timeout: float = DEFAULT_PEER_TIMEOUT_S, host: str | None = None, token: str = ""):
        self.rank = rank
        self.token = token
        self.host = host or os.environ.get(ENV_HOST) or socket.gethostname()
        self.coordinator = coordinator
        # With a coordinator the peer timeout names the lost rank first; our own deadline is the backstop.
        self.step_deadline = step_timeout + (peer_timeout if coordinator else 0.0)
        self.tokens = 0
        self.phase_name = "starting"
        self.resume_hint = ""  # rank 0: " Resume with --resume FILE", once a checkpoint exists
        self._t_progress = time.monotonic()
        self._sock: socket.socket | None = None
        self._out = b""
        self._send_lock = threading.Lock()
        self._exit_lock = threading.Lock()
        self._go = threading.Event()
        self._verdict = threading.Event()
        self._wake = threading.Event()  # the serving engine's idle ranks block on it (see wait_wake)
        self.before_exit = None  # optional callable(message), run just before the process ends on a verdict
        # Optional callable(message), run on the watchdog thread when the operator asked the
        # launcher to stop: it must end this rank in order soon (the launcher waits, then kills).
        # None: the rank prints the message and exits with the code the launcher sent.
        self.on_shutdown = None
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Connect, say hello, start the watchdog thread and wait until every rank has
        said hello; then the caller joins the MLX group."""
        if self.coordinator:
            host, _, port = self.coordinator.rpartition(":")
            try:
                self._sock = socket.create_connection((host, int(port)), timeout=10)
            except (OSError, ValueError) as e:
                self._exit(f"rank {self.rank} (host {self.host}): cannot reach the coordinator at "
                           f"{self.coordinator} ({e}); stopping.", report=False)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.setblocking(False)
            self._send({"t": "hello", "rank": self.rank, "pid": os.getpid(),
                        "host": os.environ.get(ENV_HOST), "token": self.token})
        self._thread = threading.Thread(target=self._watch, name="mlx-kvshard-liveness", daemon=True)
        self._thread.start()
        if self.coordinator and not self._go.wait(JOIN_TIMEOUT_S):
            self._exit(f"rank {self.rank} (host {self.host}): not every rank started within "
                       f"{JOIN_TIMEOUT_S:g} s; stopping.")

    def join(self, init):
        """Start, wait for every rank, then run `init` (mx.distributed.init). That holds
        the GIL while it connects, so this thread cannot run: a C-level timer ends a rank
        stuck there (faulthandler prints where and exits 1)."""
        self.start()
        self.phase("joining")
        timer = self.coordinator is not None or "MLX_RANK" in os.environ  # alone, init connects to nobody
        if timer:
            faulthandler.dump_traceback_later(JOIN_TIMEOUT_S, exit=True, file=sys.__stderr__)
        try:
            return init()
        finally:
            if timer:
                faulthandler.cancel_dump_traceback_later()
            self.phase("loading")

    def phase(self, name: str) -> None:
        self.phase_name = name
        self._t_progress = time.monotonic()
        self._send({"t": "phase", "phase": name, "n": self.tokens})

    def progress(self, tokens: int) -> None:
        """'I finished token `tokens`': called once per token from the decode loop."""
        self.tokens = tokens
        self.phase_name = "decode"
        self._t_progress = time.monotonic()
        if self._sock is not None:
            self._send_line(b'{"t":"s","n":%d}\n' % tokens)

    def wake_all(self) -> None:
        """Rank 0 of an idle serving engine: ask the coordinator to wake every rank (the
        coordinator reaches every rank; on a cluster ring addresses reach only neighbours)."""
        self._send({"t": "wake"})

    def wait_wake(self) -> None:
        """Block (no CPU) until the coordinator forwards rank 0's wake. Heartbeats go on
        from the watchdog thread, and a verdict still ends the process from there."""
        self._wake.wait()
        self._wake.clear()

    def checkpoint_written(self, path: str, tokens: int) -> None:
        self.resume_hint = f" Resume with --resume {path} ({tokens} tokens saved)."
        self._send({"t": "ckpt", "path": path, "n": tokens})

    def close(self, code: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            self._send({"t": "bye", "code": code}, flush=True)
            self._sock.close()

    def __enter__(self) -> "Liveness":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        """A lost MLX connection becomes the one clear line and EXIT_PEER_LOST; any
        other ending says bye, so the coordinator can tell a finish from a death."""
        if exc is not None and is_connection_error(exc):
            self.connection_lost(exc)
        code = 0 if exc is None else getattr(exc, "exit_code", 1)
        self.close(code)
        return False

    # ---- failures ---------------------------------------------------------------------

    def connection_lost(self, exc: BaseException) -> None:
        """MLX raised on a closed connection (it does not say which peer). The coordinator
        saw that rank's side channel close too: give it a moment to name it."""
        if self._sock is not None and self._verdict.wait(GRACE_S):
            time.sleep(GRACE_S)  # the watchdog thread is printing the verdict and exiting
        self._exit(f"rank {self.rank} (host {self.host}) lost its connection to a peer "
                   f"{where(self.tokens, self.phase_name)} ({exc}); stopping.{self.resume_hint}")

    def _exit(self, message: str, report: bool = True, code: int = EXIT_PEER_LOST) -> None:
        """Print one line and end the process at once, from any thread, even while the
        main thread is blocked inside a collective."""
        self._exit_lock.acquire()  # never released: the first caller's line is the one
        if self.before_exit is not None:
            try:
                self.before_exit(message)
            except Exception:
                pass  # ending the process matters more than telling a client
        print(f"mlx-kvshard: {message}", file=sys.stderr, flush=True)
        if report and self._sock is not None and not self._closed:
            self._send({"t": "bye", "code": code, "why": message}, flush=True)
        os._exit(code)

    # ---- the side channel ---------------------------------------------------------------

    def _send(self, msg: dict, flush: bool = False) -> None:
        """Queue one line and send what the socket takes now. Never blocks the decode
        loop: a coordinator that stops reading loses heartbeats, not our time."""
        if self._sock is not None:
            self._send_line(json.dumps(msg, separators=(",", ":")).encode() + b"\n", flush)

    def _send_line(self, line: bytes, flush: bool = False) -> None:
        with self._send_lock:
            if len(self._out) < 1 << 16:  # whole lines only, so framing survives a backlog
                self._out += line
            deadline = time.monotonic() + (1.0 if flush else 0.0)
            while self._out:
                try:
                    sent = self._sock.send(self._out)
                    self._out = self._out[sent:]
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        return
                    select.select([], [self._sock], [], 0.05)
                except OSError:
                    return  # the coordinator is gone; the watchdog thread notices on read

    def _watch(self) -> None:
        buf = b""
        last_beat = 0.0
        while not self._closed:
            now = time.monotonic()
            if self._sock is not None:
                if now - last_beat >= HEARTBEAT_S:
                    self._send({"t": "hb", "n": self.tokens})
                    last_beat = now
                try:
                    ready, _, _ = select.select([self._sock], [], [], HEARTBEAT_S / 2)
                    data = self._sock.recv(65536) if ready else None
                except (OSError, ValueError):
                    data = b"" if not self._closed else None
                if data == b"" and not self._closed:
                    self._exit(f"rank {self.rank} (host {self.host}) lost the coordinator "
                               f"{where(self.tokens, self.phase_name)} (the launcher is gone); "
                               f"stopping.{self.resume_hint}", report=False)
                buf += data or b""
                *lines, buf = buf.split(b"\n")
                if len(buf) > MAX_LINE:
                    self._exit(f"rank {self.rank} (host {self.host}): the coordinator at {self.coordinator} sent "
                               f"a line over {MAX_LINE} bytes (not ours?); stopping.", report=False)
                for line in lines:
                    self._on_message(line)
            else:
                time.sleep(HEARTBEAT_S / 2)
            if (self.phase_name == "decode" and not self._closed
                    and time.monotonic() - self._t_progress > self.step_deadline):
                self._exit(f"rank {self.rank} (host {self.host}): no progress for {self.step_deadline:g} s "
                           f"at token {self.tokens} (a peer died or stalled); stopping.{self.resume_hint}")

    def _on_message(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        if msg.get("t") == "go":
            self._go.set()
        elif msg.get("t") == "wake":
            self._wake.set()
        elif msg.get("t") == "shutdown" and not self._closed:
            text = str(msg.get("message", "stopping on request"))
            if self.on_shutdown is not None:
                self.on_shutdown(text)
            else:
                code = msg.get("code", 0)
                self._exit(f"rank {self.rank} (host {self.host}): {text}", report=False,
                           code=code if isinstance(code, int) and 0 <= code < 256 else 0)
        elif msg.get("t") == "stop" and not self._closed:
            self._verdict.set()
            self._exit(str(msg.get("message", "stopped by the coordinator")).removeprefix("mlx-kvshard: "),
                       report=False)


def is_connection_error(exc: BaseException) -> bool:
    """MLX's backends raise RuntimeError('[ring] connection to a peer was lost') and kin."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and (text.startswith(("[ring]", "[jaccl]", "[mpi]"))
                                              or "connection" in text.lower())


def for_rank(settings: LivenessSettings) -> Liveness:
    """The liveness of this process: a coordinator when the launcher named one, else
    only our own step deadline (plain `mlx.launch`). A process outside any launch has
    no peers to wait for, so no deadline."""
    coordinator = os.environ.get(ENV_COORDINATOR) or None
    if "MLX_RANK" not in os.environ and not coordinator:
        return Liveness(0, float("inf"))
    rank = int(os.environ.get("MLX_RANK", "0"))  # a world of one runs without MLX_RANK
    return Liveness(rank, settings.step_timeout, coordinator, settings.peer_timeout,
                    token=os.environ.get(ENV_TOKEN, ""))
