"""Start every rank, stream and log its output, and tell the truth about how it ended.

`mlx.launch` exits 0 when a rank failed and does not say which; here the first rank
to fail is named with its host and last lines, the others are stopped at once (the
ring has no timeout: they would wait for it forever), and the exit code is non-zero.
Each rank runs in its own process group, so a teardown reaches all of it.

SIGINT (Ctrl-C) or SIGTERM to the launcher is a stop on request: with `on_interrupt`
(the liveness coordinator's request_stop) the ranks are first asked to stop in order
and given STOP_GRACE_S to do it; whatever still runs is then terminated. The launcher
exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM) and says it stopped
on request, never that a rank failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, PIPE, Popen, TimeoutExpired
from typing import BinaryIO, Callable

from ..liveness.client import EXIT_PEER_LOST
from . import kernels

from . import secrets
from .spec import LaunchSpec, RankLaunch, _is_loopback

TAIL_LINES = 15
STOP_GRACE_S = 20.0  # after a stop on request, how long the ranks may take to stop in order (a server drains)


@dataclass
class _Rank:
    launch: RankLaunch
    proc: Popen
    log: BinaryIO
    started: float
    pidfile: str | None = None
    returncode: int | None = None
    ended: float | None = None
    stopped: bool = False  # ended because the launcher tore it down
    tail: deque = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def who(self) -> str:
        return f"rank {self.launch.rank} ({self.launch.host.label})"


class _Terminated(KeyboardInterrupt):
    """SIGTERM to the launcher: tear down like Ctrl-C."""


@dataclass
class _Outcome:
    interrupted: signal.Signals | None = None  # SIGINT (Ctrl-C) or SIGTERM to the launcher
    hung: bool = False  # a rank kept running finish_timeout after another finished
    stopped: list[_Rank] = field(default_factory=list)  # torn down while still running
    t_stop: float = 0.0  # seconds the teardown took


def run(spec: LaunchSpec, run_dir: str | Path, *, quiet_ranks: bool = False, out: BinaryIO | None = None,
        err: BinaryIO | None = None, grace: float = 3.0, finish_timeout: float | None = 30.0,
        announce: bool = True, on_interrupt: Callable[[str, int], None] | None = None) -> int:
    """Run every rank to the end. `quiet_ranks`: rank 0's stdout passes through as is
    (callers parse it) and the other ranks' stdout goes to their logs only; otherwise
    every line is prefixed with `[rank N host]`. `on_interrupt(signal name, exit code)`
    asks the ranks to stop in order. Returns the exit code to use."""
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "launch.json").write_text(json.dumps(spec.to_dict(), indent=2))  # the token redacted
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            err.write(f"mlx-kvshard launch: {text}\n".encode())
            err.flush()

    if announce:
        say(f"{spec.world} rank(s), backend {spec.backend}, logs in {run_dir}")
    ranks: list[_Rank] = []
    outcome = _run_ranks(spec, run_dir, ranks, lock, quiet_ranks, out, err, grace, finish_timeout, on_interrupt)
    code, message = _verdict(ranks, run_dir, outcome, finish_timeout)
    _write_result(run_dir, ranks, code)
    if ranks and all(r.returncode is not None and r.returncode >= 0 for r in ranks):
        kernels.keep(run_dir / "tmp")  # every rank exited on its own: no compiler was cut off mid-write
    if message:
        say(message)
    return code


def _run_ranks(spec: LaunchSpec, run_dir: Path, ranks: list[_Rank], lock: threading.Lock, quiet_ranks: bool,
               out: BinaryIO, err: BinaryIO, grace: float, finish_timeout: float | None,
               on_interrupt: Callable[[str, int], None] | None) -> _Outcome:
    """Start, supervise and tear down; `ranks` fills as they start, so an interrupt at
    any point still reaches every rank started so far."""
    outcome = _Outcome()
    wake = threading.Event()
    old_term = _on_sigterm()
    try:
        try:
            _start(spec, run_dir, ranks)
            for r in ranks:  # reader threads only once every rank is forked (fork safety)
                raw = quiet_ranks and r.launch.rank == 0
                to_out = None if (quiet_ranks and r.launch.rank != 0) else out
                r.threads = [
                    _thread(_pump, r, r.proc.stdout, to_out, lock, raw, True),
                    _thread(_pump, r, r.proc.stderr, err, lock, False, False),
                    _thread(_wait, r, wake),
                ]
            outcome.hung = _supervise(ranks, wake, finish_timeout)
        except KeyboardInterrupt as e:
            outcome.interrupted = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
            t0 = time.monotonic()
            if on_interrupt is not None:
                # A repeated SIGTERM is common (a service manager and a wrapper both pass it on):
                # only a second Ctrl-C cuts the orderly stop short.
                old = signal.signal(signal.SIGTERM, signal.SIG_IGN) if _main_thread() else None
                try:
                    on_interrupt(outcome.interrupted.name, 128 + outcome.interrupted)
                    _wait_all(ranks, wake, STOP_GRACE_S)
                except KeyboardInterrupt:
                    pass  # Ctrl-C again: stop them now
                finally:
                    if old is not None:
                        signal.signal(signal.SIGTERM, old)
            outcome.t_stop = time.monotonic() - t0
        finally:
            # A second Ctrl-C must not cut the teardown short and leave ranks behind.
            with _signals_ignored():
                t0 = time.monotonic()
                outcome.stopped = _teardown(spec, ranks, grace)
                outcome.t_stop += time.monotonic() - t0
    finally:
        _restore_sigterm(old_term)
        for r in ranks:
            for t in r.threads[:2]:
                t.join(timeout=2.0)
            r.log.close()
    return outcome


def _start(spec: LaunchSpec, run_dir: Path, ranks: list[_Rank]) -> None:
    tmp = run_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    # MLX's launch script leaves its pidfile and MLX_HOSTFILE in $TMPDIR: keep local ones in the run dir.
    local_env = {**os.environ, "TMPDIR": str(tmp)}
    kernels.seed(tmp)  # ... but MLX's compiled CPU kernels live there too: don't compile them again
    die_with_parent = _die_with_parent()
    cores = _local_core_shares(spec)
    for launch in spec.ranks:
        log = open(run_dir / f"rank{launch.rank}-{launch.host.label}.log", "wb")
        proc = Popen(launch.launch_argv, stdin=PIPE, stdout=PIPE, stderr=PIPE,
                     env=local_env if launch.host.is_local else None, start_new_session=True,
                     preexec_fn=_preexec(die_with_parent, cores.get(launch.rank)))
        ranks.append(_Rank(launch, proc, log, time.monotonic()))


def _supervise(ranks: list[_Rank], wake: threading.Event, finish_timeout: float | None) -> bool:
    """Return once a rank failed, every rank finished, or one hangs after the others: True then."""
    while True:
        wake.wait(timeout=0.5)
        wake.clear()
        if any(r.returncode not in (None, 0) for r in ranks):
            return False
        done = [r for r in ranks if r.returncode is not None]
        if len(done) == len(ranks):
            return False
        if done and finish_timeout is not None and time.monotonic() - min(r.ended for r in done) > finish_timeout:
            return True


def _wait_all(ranks: list[_Rank], wake: threading.Event, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(r.returncode is None for r in ranks) and time.monotonic() < deadline:
        wake.wait(timeout=0.2)
        wake.clear()


def _teardown(spec: LaunchSpec, ranks: list[_Rank], grace: float) -> list[_Rank]:
    live = [r for r in ranks if r.returncode is None]
    for r in live:
        r.stopped = True
    killers = []
    for r in live:
        argv = spec.kill_argv(r.launch, r.pidfile) if r.pidfile else None
        if argv:  # the remote rank by its pid; the pty hang-up below usually gets there first
            killers.append(Popen(argv, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL, start_new_session=True))
    for r in live:
        _signal_group(r.proc, signal.SIGTERM)
        _signal_group(r.proc, signal.SIGCONT)  # a stopped (stalled) rank acts on SIGTERM only once resumed
    deadline = time.monotonic() + grace
    for r in live:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutExpired:
            pass
    for r in ranks:
        # SIGKILL every group, finished ones too: whatever a rank left behind goes with it.
        _signal_group(r.proc, signal.SIGKILL)
    for p in [r.proc for r in ranks] + killers:
        try:
            p.wait(timeout=5.0)
        except TimeoutExpired:
            p.kill()
    return live


def _verdict(ranks: list[_Rank], run_dir: Path, outcome: _Outcome,
             finish_timeout: float | None) -> tuple[int, str | None]:
    stopped, t_stop = outcome.stopped, outcome.t_stop
    stopped_note = (f"; stopped {', '.join(r.who for r in stopped)} in {t_stop:.2f}s" if stopped else "")
    if outcome.interrupted is not None:
        how = (f"all {len(ranks)} rank(s) stopped in order in {t_stop:.2f}s" if not stopped else
               f"stopped all {len(ranks)} rank(s) in {t_stop:.2f}s")
        return 128 + outcome.interrupted, f"stopped on request ({outcome.interrupted.name}): {how}; logs in {run_dir}"
    # A rank that exited PEER_LOST only reports another's failure: blame the cause first.
    failed = sorted((r for r in ranks if r.returncode not in (None, 0) and not r.stopped),
                    key=lambda r: (r.returncode == EXIT_PEER_LOST, r.ended or 0.0))
    if failed:
        first = failed[0]
        lines = [f"{first.who} failed: {_describe_exit(first)} after {first.ended - first.started:.1f}s"
                 f"{stopped_note}"]
        if len(failed) > 1:
            lines.append("  then also failed: " + ", ".join(f"{r.who} ({_describe_exit(r)})" for r in failed[1:]))
        lines.append(f"  last output of {first.who} (full log: {_log_path(run_dir, first)}):")
        lines += [f"    | {t}" for t in first.tail] or ["    | (no output)"]
        rc = first.returncode
        return (rc if 0 < rc < 256 else 1), "\n".join(lines)
    if outcome.hung:
        names = ", ".join(r.who for r in stopped)
        return 1, (f"{names} still running {finish_timeout:g}s after another rank finished; stopped "
                   f"(a rank left waiting on a collective its peers never issued hangs forever); logs in {run_dir}")
    return 0, None


def _describe_exit(r: _Rank) -> str:
    rc = r.returncode
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == 255 and not r.launch.host.is_local:
        return "exited with code 255 (ssh could not run it, or it died by a signal; try `launch --check`)"
    return f"exited with code {rc}"


def _log_path(run_dir: Path, r: _Rank) -> Path:
    return run_dir / f"rank{r.launch.rank}-{r.launch.host.label}.log"


def _write_result(run_dir: Path, ranks: list[_Rank], code: int) -> None:
    result = {"exit_code": code, "ranks": [
        {"rank": r.launch.rank, "host": r.launch.host.label, "returncode": r.returncode, "stopped": r.stopped,
         "seconds": None if r.ended is None else round(r.ended - r.started, 3)} for r in ranks]}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))


def _pump(r: _Rank, stream, sink: BinaryIO | None, lock: threading.Lock, raw: bool, is_stdout: bool) -> None:
    """Copy one output stream to the rank log and (prefixed, or raw for rank 0) to `sink`."""
    prefix = f"[rank {r.launch.rank} {r.launch.host.label}] ".encode()
    fd = stream.fileno()
    pending = b""
    expect_pidfile = is_stdout  # MLX's launch script prints its pidfile path first
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        if expect_pidfile:
            pending += chunk
            if b"\n" not in pending:
                continue
            first, chunk = pending.split(b"\n", 1)
            r.pidfile, pending, expect_pidfile = first.strip(b"\r").decode(errors="replace"), b"", False
            _send_secrets(r)
            if not chunk:
                continue
        if raw:
            _emit(r, sink, lock, chunk, chunk)
            _remember(r, chunk)
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _line(r, sink, lock, prefix, line)
    if pending and not raw:  # a last line without newline (or output that never had the pidfile)
        _line(r, sink, lock, prefix, pending)


def _send_secrets(r: _Rank) -> None:
    """The rank's secrets on its stdin (launch/secrets.py): now, once its launch script has
    printed the pidfile, which it does after turning a remote pty's echo off."""
    if not r.launch.secrets:
        return
    try:
        r.proc.stdin.write(secrets.line(r.launch.secrets))
        r.proc.stdin.flush()
    except OSError:  # it already ended: its exit says why
        pass


def _line(r: _Rank, sink: BinaryIO | None, lock: threading.Lock, prefix: bytes, line: bytes) -> None:
    line = line.rstrip(b"\r")  # a pty (ssh -tt) ends lines with \r\n
    _emit(r, sink, lock, line + b"\n", prefix + line + b"\n")
    r.tail.append(line.decode(errors="replace"))


def _emit(r: _Rank, sink: BinaryIO | None, lock: threading.Lock, for_log: bytes, for_sink: bytes) -> None:
    with lock:
        r.log.write(for_log)
        r.log.flush()
        if sink is not None:
            try:
                sink.write(for_sink)
                sink.flush()
            except OSError:  # our reader went away (`| head`): keep draining, or the rank blocks on a full pipe
                pass


def _remember(r: _Rank, chunk: bytes) -> None:
    for line in chunk.decode(errors="replace").splitlines():
        if line.strip():
            r.tail.append(line)


def _wait(r: _Rank, wake: threading.Event) -> None:
    rc = r.proc.wait()
    r.ended = time.monotonic()  # before returncode: whoever sees the code may read the time
    r.returncode = rc
    wake.set()


def _thread(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def _signal_group(proc: Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _local_core_shares(spec: LaunchSpec) -> dict[int, set[int]]:
    """Simulated ranks on one Linux machine each get their own cores. MLX's ring threads
    busy-poll while a collective waits, so unpinned ranks steal each other's cores:
    measured on 2 cores, 16 all_sums per token took 18.4 ms unpinned, 1.2 ms pinned.
    MLX_KVSHARD_PIN=0 turns it off. A host whose ring addresses are all loopback is this
    machine too, whatever its ssh name (the tests' ssh stand-in)."""
    local = [r for r in spec.ranks
             if r.host.is_local or (r.host.ips and all(_is_loopback(ip) for ip in r.host.ips))]
    if (len(local) < 2 or not hasattr(os, "sched_setaffinity")
            or os.environ.get("MLX_KVSHARD_PIN", "1") == "0"):
        return {}
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // len(local))
    return {r.rank: {cores[(i * per + j) % len(cores)] for j in range(per)} for i, r in enumerate(local)}


def _preexec(die_with_parent, cores: set[int] | None):
    """Runs in the child before exec: its threads (BLAS, MLX) inherit the affinity."""
    if die_with_parent is None and cores is None:
        return None

    def preexec() -> None:
        if die_with_parent is not None:
            die_with_parent()
        if cores:
            os.sched_setaffinity(0, cores)

    return preexec


def _die_with_parent():
    """On Linux, have the kernel SIGTERM a rank if the launcher dies without cleaning up."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not import after fork
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class _signals_ignored:
    def __enter__(self):
        self.old = {}
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_sigterm():
    if not _main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(old) -> None:
    if old is not None:
        signal.signal(signal.SIGTERM, old)
