"""Requests that survive a lost rank: `serve --simulate 3 --restart N` keeps the HTTP front
in the launcher, and a stream in flight when a rank is SIGKILLed continues on the
relaunched group where it stopped: its whole text equals an undisturbed run's (greedy, and
sampled at a fixed seed), no token repeated or lost. Past --migration-limit the client
gets one clear error event."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

import httpx
import pytest

from checkpoints import checkpoint
from liveness_procs import tagged, wait_for
from server_procs import Server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

PEER_TIMEOUT = 5.0
# seed 1 runs the whole 80 tokens (some seeds meet EOS within a few: nothing left to move)
BODIES = {"greedy": {"prompt": "alpha beta gamma delta", "max_tokens": 160, "temperature": 0},
          "sampled": {"prompt": "epsilon zeta eta", "max_tokens": 160, "temperature": 0.8, "top_p": 0.95,
                      "seed": 1}}


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "llama_kv8")


def stream(server: Server, body: dict, events: list) -> None:
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=600,
                      headers=getattr(server, "headers", None)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))


def text_of(events: list) -> str:
    errors = [e for e in events if "error" in e]
    assert not errors, errors
    return "".join(e["choices"][0]["text"] for e in events)


def ranks(tag: str, world: int) -> dict[int, int]:
    """rank -> pid of the rank processes (the launcher carries the tag too, but no MLX_RANK)."""
    def is_rank(pid: int) -> bool:
        return b"MLX_RANK=" in Path(f"/proc/{pid}/environ").read_bytes()

    wait_for(lambda: len({r for p, r in tagged(tag).items() if is_rank(p)}) == world, None, 300, "every rank")
    return {r: p for p, r in tagged(tag).items() if is_rank(p)}


def interrupted(server: Server, body: dict, victim: int, world: int, sig: int) -> tuple[list, str]:
    """Stream `body`; signal rank `victim` once a few tokens have arrived; wait for the end."""
    pids = ranks(server.tag, world)
    events: list = []
    t = threading.Thread(target=stream, args=(server, body, events))
    t.start()
    wait_for(lambda: len(events) >= 4, server.proc, 300, "tokens streaming")
    os.kill(pids[victim], sig)
    t.join(timeout=600)
    assert not t.is_alive()
    return events, server.stderr()


def concurrent(server: Server, bodies: list[dict]) -> list[list]:
    out = [[] for _ in bodies]
    threads = [threading.Thread(target=stream, args=(server, b, out[i])) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return out


def world2_metrics_then_orderly_stop(server: Server) -> str:
    """/metrics (rank 0's engine answers through the front) shows the relaunched world-2
    group; then SIGTERM stops it in order, as without a front. Returns the metrics text."""
    m = httpx.get(server.url + "/metrics", timeout=60, headers=getattr(server, "headers", None))
    assert m.status_code == 200 and "mlx_kvshard_world_size 2.0" in m.text, m.text[:2000]
    os.killpg(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped on request (SIGTERM): all 2 rank(s) stopped in order" in server.stderr()
    return m.text


def moved(err: str) -> int:
    return sum(int(m) for m in re.findall(r"moved (\d+) request\(s\) in flight to the relaunched group", err))


def test_streams_continue_exactly_after_a_rank_is_killed_or_stalled(model, tmp_path):
    """World 3, --restart 4: SIGKILL rank 1 (greedy stream), SIGKILL rank 0's engine (a
    sampled stream at a fixed seed), then SIGSTOP rank 2 under 8 concurrent streams while a
    ninth client leaves during the recovery. Every stream completes with the undisturbed text."""
    tag = f"front-{os.getpid()}"
    server = Server(tmp_path, ["serve", "--simulate", "3", "--restart", "4", "--model", str(model), "--port", "0",
                               "--max-context", "256", "--peer-timeout", str(PEER_TIMEOUT)], tag)
    try:
        server.wait_ready()
        for mode, victim in (("greedy", 1), ("sampled", 0)):
            undisturbed: list = []
            stream(server, BODIES[mode], undisturbed)
            before = moved(server.stderr())
            events, err = interrupted(server, BODIES[mode], victim, 3, signal.SIGKILL)
            assert f"rank {victim} (host 127.0.0.1) died" in err, err[-3000:]
            assert moved(err) == before + 1, err[-3000:]
            assert text_of(events) == text_of(undisturbed), mode
            assert events[-1]["choices"][0]["finish_reason"] == undisturbed[-1]["choices"][0]["finish_reason"]
            wait_for(lambda: server.health() == 200, server.proc, 300, "the group back")

        bodies = [{**BODIES["greedy"], "prompt": f"{w} beta gamma", "max_tokens": 60}
                  for w in ("alpha", "delta", "theta", "kappa")]
        bodies += [{**BODIES["sampled"], "seed": seed, "max_tokens": 60} for seed in (1, 2, 4, 5)]
        undisturbed = concurrent(server, bodies)
        pids = ranks(tag, 3)
        out = [[] for _ in bodies]
        threads = [threading.Thread(target=stream, args=(server, b, out[i])) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        leaver = httpx.stream("POST", server.url + "/v1/completions", json={**BODIES["greedy"], "stream": True},
                              timeout=600)
        r = leaver.__enter__()
        lines = r.iter_lines()
        wait_for(lambda: all(len(o) >= 2 for o in out), server.proc, 300, "every stream under way")
        next(lines)
        os.kill(pids[2], signal.SIGSTOP)
        wait_for(lambda: server.health() != 200, server.proc, PEER_TIMEOUT + 60, "the recovery")
        leaver.__exit__(None, None, None)  # a client that leaves while the group is down
        for t in threads:
            t.join(timeout=600)
        err = server.stderr()
        assert "rank 2 (host 127.0.0.1) stopped responding" in err, err[-3000:]
        assert moved(err) >= 4, err[-3000:]  # the two before, and the streams under way at the stall
        assert [text_of(o) for o in out] == [text_of(u) for u in undisturbed]
        wait_for(lambda: server.health() == 200, server.proc, 300, "the group back")
    finally:
        server.stop()
    assert not tagged(tag)


@pytest.mark.parametrize("flags, why", [
    (["--migration-limit", "0"], "--migration-limit 0"),
    (["--migration-timeout", "0.5"], "--migration-timeout"),
], ids=["limit", "timeout"])  # the front under `launch` (over TCP): the last test
def test_past_the_migration_bounds_the_client_gets_one_error(model, tmp_path, flags, why):
    tag = f"front-bound-{os.getpid()}"
    server = Server(tmp_path, ["serve", "--simulate", "2", "--restart", "1", *flags, "--model", str(model),
                               "--port", "0", "--max-context", "256", "--peer-timeout", str(PEER_TIMEOUT)], tag)
    try:
        server.wait_ready()
        events, _ = interrupted(server, BODIES["greedy"], 1, 2, signal.SIGKILL)
        errors = [e for e in events if "error" in e]
        assert len(errors) == 1 and why in errors[0]["error"]["message"], events[-3:]
        # the loss is named by whoever saw it first: the coordinator (rank 1 died) or rank 0's ring
        msg = errors[0]["error"]["message"]
        assert "rank 1 (host 127.0.0.1) died" in msg or "connection to a peer was lost" in msg, msg
        wait_for(lambda: server.health() == 200, server.proc, 300, "the group back")
        r = httpx.post(server.url + "/v1/completions", json={**BODIES["greedy"], "max_tokens": 4}, timeout=600)
        assert r.status_code == 200  # the next request runs on the relaunched group
        world2_metrics_then_orderly_stop(server)
    finally:
        server.stop()
    assert not tagged(tag)


def test_rank0_on_another_mac_over_tcp_then_a_smaller_world_after_exclude(model, tmp_path, monkeypatch):
    """`launch --hostfile` over three 'remote' hosts (the launch tests' ssh shim; ranks on
    127.0.0.1): the front listens on TCP and rank 0 says hello with the token it read on its
    stdin. SIGKILL of rank 0's engine mid-stream with `--exclude failed`: the group comes back
    on the two hosts left and the stream completes. The text equals the undisturbed runs at
    world 3 and at world 2 (this tiny float32 model's greedy tokens do not change with the
    layout; in general the continuation may differ by its rounding). --check-sync audits and
    log-probability pieces come through the front (which has no tokenizer); the front checks
    the API key given to the ranks with `launch --env`."""
    from test_launch_run import shim_hostfile

    hf, shim, log = shim_hostfile(tmp_path, monkeypatch, hosts=("mini-a", "mini-b", "mini-c"))
    tag = f"front-tcp-{os.getpid()}"
    server = Server(tmp_path, ["launch", "--hostfile", str(hf), "--ssh-command", str(shim), "--restart", "1",
                               "--exclude", "failed", "--skip-check", "--env", "MLX_KVSHARD_API_KEY=k3y", "--",
                               "serve", "--model", str(model),
                               "--port", "0", "--max-context", "256", "--peer-timeout", str(PEER_TIMEOUT),
                               "--check-sync"], tag, env={"SHIM_LOG": str(log)})
    body = {**BODIES["greedy"], "max_tokens": 64}
    try:
        server.wait_ready()
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 401
        server.headers = {"Authorization": "Bearer k3y"}
        world3: list = []
        stream(server, body, world3)
        events, err = interrupted(server, body, 0, 3, signal.SIGKILL)
        assert "rank 0 (host mini-a) died" in err, err[-3000:]
        assert ("restart 1/1 on 2 rank(s) (mini-b, mini-c): serving again; the requests in flight continue on "
                "the relaunched group") in err, err[-3000:]
        assert moved(err) == 1, err[-3000:]
        wait_for(lambda: server.health() == 200, server.proc, 300, "the group back")
        world2: list = []
        stream(server, {**body, "logprobs": 1}, world2)
        assert text_of(world2) == text_of(world3)  # the model makes the two layouts agree on these tokens
        assert text_of(events) == text_of(world3)
        pieces = [p for e in world2 for p in (e["choices"][0].get("logprobs") or {}).get("tokens", [])]
        assert len(pieces) == body["max_tokens"] and "".join(pieces) == text_of(world2)
        m = world2_metrics_then_orderly_stop(server)
        assert re.findall(r'mlx_kvshard_audited_batch_rows\{rank="(\d)"\} 0\.0', m) == ["0", "1"], m
    finally:
        server.stop()
    assert not tagged(tag)


def test_the_tcp_front_takes_one_bounded_hello_with_its_token():
    """In process: the front rank 0 reaches over TCP drops a wrong token, a hello past its
    bound and connections past the MAX_PENDING still silent ones (at once), and serves the
    rank 0 whose hello carries its token until that connection goes (/health: recovering)."""
    import socket
    import time

    from mlx_kvshard.front.messages import ENV_FRONT, ENV_FRONT_TOKEN, MAX_HELLO
    from mlx_kvshard.front.server import MAX_PENDING, FrontServer
    from mlx_kvshard.settings import ServerSettings

    def dropped(sock: socket.socket) -> bool:
        sock.settimeout(30)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def hello(token: str) -> bytes:
        return json.dumps({"t": "hello", "token": token, "info": {"world": 2}}).encode() + b"\n"

    front = FrontServer(ServerSettings(port=0), 3, 120.0, tcp=True)
    env = front.env("127.0.0.1")
    host, port = env[ENV_FRONT].removeprefix("tcp:").rsplit(":", 1)
    conn = lambda: socket.create_connection((host, int(port)), timeout=30)  # noqa: E731
    try:
        wrong, long = conn(), conn()
        wrong.sendall(hello("x" * len(env[ENV_FRONT_TOKEN])))
        long.sendall(b"{" * (MAX_HELLO + 2))
        assert dropped(wrong) and dropped(long)
        silent = [conn() for _ in range(MAX_PENDING)]
        time.sleep(0.5)  # each is accepted and waits for its hello
        extra = conn()
        assert dropped(extra)  # long before the hello deadline of the silent ones
        for s in silent:
            s.close()
        time.sleep(0.5)
        rank0 = conn()
        rank0.sendall(hello(env[ENV_FRONT_TOKEN]))
        wait_for(lambda: front.backend.state == "ready", None, 30, "rank 0 attached")
        assert front.remote.info() == {"world": 2}
        rank0.close()
        wait_for(lambda: front.backend.state == "recovering", None, 30, "the loss noticed")
    finally:
        front.close("the test ends", lost=False)
