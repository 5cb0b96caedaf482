"""The control plane only our own processes can join, and a stop on request reads as one.

A real `serve --simulate 2`: strangers connect to its liveness coordinator (a hello
without the launch's token, a hello with it for a rank that already joined, junk, a
10 MB line with no newline); each is dropped and counted, the launcher's memory does
not grow with them, and the server goes on answering with the same greedy tokens.
Then SIGTERM to the launcher: every rank stops in order, the launcher says it stopped
on request and exits 143 (128 + SIGTERM), and nothing reads like a failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from liveness_procs import REPO, rank_pids, tagged
from mlx_kvshard.liveness.client import ENV_COORDINATOR, ENV_TOKEN
from server_procs import Server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

BIG = 10 << 20  # bytes of the line with no newline
HOOKS = Path(__file__).resolve().parent / "hooks"


def rank_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the coordinator has closed this connection (EOF or reset)."""
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def greedy(server: Server) -> str:
    r = httpx.post(server.url + "/v1/completions", timeout=600, json={
        "model": "tiny", "prompt": "the cluster", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_strangers_are_dropped_and_counted_and_sigterm_stops_in_order(tmp_path):
    tag = f"control-{os.getpid()}"
    # The token reaches the ranks on stdin, not in their environment: a test hook keeps a copy.
    server = Server(tmp_path, ["serve", "--simulate", "2", "--model", "tiny", "--port", "0"], tag,
                    env={"PYTHONPATH": os.pathsep.join([str(HOOKS), str(REPO)]),
                         "MLX_KVSHARD_TEST_SECRETS_TO": str(tmp_path)})
    try:
        server.wait_ready()
        before = greedy(server)
        env = rank_env(rank_pids(tag, 2)[1])
        assert ENV_TOKEN not in env  # not in /proc/PID/environ (nor on any command line)
        address, token = env[ENV_COORDINATOR], json.loads((tmp_path / "rank1.json").read_text())[ENV_TOKEN]
        assert len(token) >= 24
        launcher_rss = rss_bytes(server.proc.pid)

        hellos = [{"t": "hello", "rank": 1, "pid": 1},  # no token: would take rank 1's slot before
                  {"t": "hello", "rank": 1, "pid": 1, "token": "x" * len(token)},  # a wrong one
                  {"t": "hello", "rank": 1, "pid": 1, "token": token}]  # ours, but rank 1 already joined
        for hello in hellos:
            with connect(address) as s:
                s.sendall(json.dumps(hello).encode() + b"\n")
                assert closed_by_peer(s), hello
        with connect(address) as s:  # not even JSON
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert closed_by_peer(s)
        with connect(address) as s:  # one line of 10 MB that never ends
            sent, cut_off = 0, False
            try:
                while sent < BIG:
                    sent += s.send(b"x" * 65536)
            except (ConnectionResetError, BrokenPipeError):
                cut_off = True
            assert cut_off or closed_by_peer(s)  # dropped long before the end, not buffered
        assert rss_bytes(server.proc.pid) - launcher_rss < BIG // 2

        assert server.health() == 200
        assert greedy(server) == before  # the ranks never noticed

        os.killpg(server.proc.pid, signal.SIGTERM)
        rc = server.proc.wait(timeout=120)
        err = server.stderr()
        assert rc == 128 + signal.SIGTERM, err[-3000:]
        assert "mlx-kvshard: stopping on request (SIGTERM): telling every rank to stop" in err
        assert "stopped on request (SIGTERM): all 2 rank(s) stopped in order" in err, err[-3000:]
        assert "5 connection(s) to the coordinator were dropped" in err, err[-3000:]
        for failure in ("died", "failed", "lost", "stopped responding"):
            assert failure not in err, err[-3000:]
    finally:
        server.stop()
    assert not tagged(tag)
