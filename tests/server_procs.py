"""A real `mlx-kvshard serve` for tests: start it as a subprocess (its own session, tagged so
every rank can be found and reaped), learn its port, wait on /health."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from liveness_procs import REPO, env_for, reap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, argv: list[str], tag: str, port: int | None = None,
                 env: dict[str, str] | None = None):
        self.tag = tag
        self.out, self.err = tmp / f"{tag}.out", tmp / f"{tag}.err"
        env = {**env_for(tag), "TMPDIR": str(tmp), **(env or {})}  # the launcher keeps a failed run's logs under TMPDIR
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_kvshard", *argv], stdout=open(self.out, "wb"),
                                     stderr=open(self.err, "wb"), stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{port}" if port else None
        self.health_seen: list[tuple[int, dict]] = []  # every /health answer while waiting

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode} before it was ready:\n{self.stderr()[-4000:]}")
            if self.url is None:
                m = re.search(r"HTTP on (http://127\.0\.0\.1:\d+)", self.stderr())
                self.url = m.group(1) if m else None
            if self.url is not None and self.health() == 200:
                return self
            time.sleep(0.1)
        raise AssertionError(f"serve not healthy within {timeout}s:\n{self.stderr()[-4000:]}")

    def health(self) -> int | None:
        try:
            r = httpx.get(self.url + "/health", timeout=10)
        except httpx.HTTPError:
            return None
        self.health_seen.append((r.status_code, r.json()))
        return r.status_code

    def stop(self) -> int | None:
        """SIGTERM the launcher (it stops every rank), then make sure nothing is left."""
        rc = None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=30)
            except Exception:
                pass
        reap(self.tag, self.proc)
        return rc if rc is not None else self.proc.returncode
