"""Requests that survive a lost rank: `serve --simulate 3 --restart N` keeps the HTTP front
in the launcher, and a stream in flight when a rank is SIGKILLed continues on the
relaunched group where it stopped: its whole text equals an undisturbed run's (greedy, and
sampled at a fixed seed), no token repeated or lost. Past --migration-limit the client
gets one clear error event."""

from __future__ import annotations

import json
import os
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
BODIES = {"greedy": {"prompt": "alpha beta gamma delta", "max_tokens": 120, "temperature": 0},
          "sampled": {"prompt": "epsilon zeta eta", "max_tokens": 120, "temperature": 0.8, "top_p": 0.95,
                      "seed": 11}}


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "llama_kv8")


def stream(server: Server, body: dict, events: list) -> None:
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=600) as r:
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


def interrupted(server: Server, body: dict, victim: int, world: int) -> tuple[list, str]:
    """Stream `body`; SIGKILL rank `victim` once a few tokens have arrived; wait for the end."""
    pids = ranks(server.tag, world)
    events: list = []
    t = threading.Thread(target=stream, args=(server, body, events))
    t.start()
    wait_for(lambda: len(events) >= 4, server.proc, 300, "tokens streaming")
    os.kill(pids[victim], signal.SIGKILL)
    t.join(timeout=600)
    assert not t.is_alive()
    return events, server.stderr()


def test_a_stream_continues_exactly_after_rank_1_and_rank_0_are_lost(model, tmp_path):
    tag = f"front-{os.getpid()}"
    server = Server(tmp_path, ["serve", "--simulate", "3", "--restart", "3", "--model", str(model), "--port", "0",
                               "--max-context", "256", "--peer-timeout", str(PEER_TIMEOUT)], tag)
    try:
        server.wait_ready()
        for mode, victim in (("greedy", 1), ("sampled", 0)):
            undisturbed: list = []
            stream(server, BODIES[mode], undisturbed)
            events, err = interrupted(server, BODIES[mode], victim, 3)
            assert f"rank {victim}" in err and "restart" in err, err[-3000:]
            assert text_of(events) == text_of(undisturbed), mode
            assert events[-1]["choices"][0]["finish_reason"] == undisturbed[-1]["choices"][0]["finish_reason"]
            wait_for(lambda: server.health() == 200, server.proc, 300, "the group back")
    finally:
        server.stop()
    assert not tagged(tag)


def test_past_the_migration_limit_the_client_gets_one_error(model, tmp_path):
    tag = f"front-limit-{os.getpid()}"
    server = Server(tmp_path, ["serve", "--simulate", "2", "--restart", "1", "--migration-limit", "0",
                               "--model", str(model), "--port", "0", "--max-context", "256",
                               "--peer-timeout", str(PEER_TIMEOUT)], tag)
    try:
        server.wait_ready()
        events, _ = interrupted(server, BODIES["greedy"], 1, 2)
        errors = [e for e in events if "error" in e]
        assert len(errors) == 1 and "--migration-limit 0" in errors[0]["error"]["message"], events[-3:]
        assert "rank 1" in errors[0]["error"]["message"]
        wait_for(lambda: server.health() == 200, server.proc, 300, "the group back")
        r = httpx.post(server.url + "/v1/completions", json={**BODIES["greedy"], "max_tokens": 4}, timeout=600)
        assert r.status_code == 200  # the next request runs on the relaunched group
    finally:
        server.stop()
    assert not tagged(tag)
