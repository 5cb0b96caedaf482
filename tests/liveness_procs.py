"""Real rank processes for the liveness tests: start `generate`, find each rank's pid,
signal one, and make sure nothing is left behind whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAG = "MLX_KVSHARD_TEST_TAG"  # marks every process of one test run, so we can find and reap them


def env_for(tag: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env[TAG] = tag
    return env


def start(argv: list[str], tag: str, out: Path, err: Path) -> subprocess.Popen:
    """`python argv...` in its own session, output to files (no pipe can fill up)."""
    return subprocess.Popen([sys.executable, *argv], stdout=open(out, "wb"), stderr=open(err, "wb"),
                            stdin=subprocess.DEVNULL, env=env_for(tag), cwd=REPO, start_new_session=True)


def tagged(tag: str) -> dict[int, int]:
    """pid -> MLX rank of every live rank process (python -m mlx_kvshard) carrying `tag`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{TAG}={tag}".encode() in env and argv[1:3] == [b"-m", b"mlx_kvshard"] and alive(int(entry)):
            rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"MLX_RANK=")), 0)
            found[int(entry)] = rank
    return found


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (exited, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def rank_pids(tag: str, world: int, timeout: float = 60) -> dict[int, int]:
    """rank -> pid, once all `world` ranks are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        by_rank = {r: p for p, r in tagged(tag).items()}
        if len(by_rank) == world:
            return by_rank
        time.sleep(0.1)
    raise AssertionError(f"only ranks {sorted(by_rank)} of {world} started within {timeout}s")


def checkpoint_tokens(path: Path) -> int:
    from mlx_kvshard.errors import UserError
    from mlx_kvshard.liveness.checkpoint import read

    try:
        return len(read(path).tokens)
    except UserError:  # not written yet
        return 0


def wait_for(cond, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def reap(tag: str, proc: subprocess.Popen | None) -> None:
    """SIGKILL the launcher's session and every tagged rank (each runs in its own session)."""
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    for pid in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30  # SIGKILL is delivered asynchronously; a loaded machine takes a moment
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
