"""Step messages cannot overflow, and an engine that dies never leaves a front answering 500.

The issue's repro through real HTTP at world 2: many distinct short prompts fill a small
prefix cache, then one long prompt evicts every entry in one step (thousands of evictions
spread over as many step messages as they need); the long prompt's greedy tokens still
equal the tokens of a cold server (no prefix cache). And an engine killed by an internal
error turns /health 503 with the reason and the server exits non-zero."""

from __future__ import annotations

import os
from pathlib import Path
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from checkpoints import checkpoint
from liveness_procs import tagged
from server_procs import Server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

N_SHORT = 300  # distinct prompts of SHORT tokens: more evictions than one step message carries (MAX_DROPS)
SHORT = 16
LONG = N_SHORT * SHORT  # its insertion evicts every short entry at once


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "llama_kv8")


def start(model, tmp_path_factory, tag: str, *flags: str) -> Server:
    tmp = tmp_path_factory.mktemp(tag)
    return Server(tmp, ["serve", "--simulate", "2", "--model", str(model), "--served-model-name", "m", "--port", "0",
                        "--max-context", str(LONG + 64),
                        "--peer-timeout", "5", *flags], f"{tag}-{os.getpid()}")


def complete(server: Server, prompt: list[int], max_tokens: int) -> dict:
    r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def gauge(server: Server, name: str) -> float:
    line = next(x for x in httpx.get(server.url + "/metrics").text.splitlines() if x.startswith(f"mlx_kvshard_{name} "))
    return float(line.split()[-1])


def long_prompt() -> list[int]:
    return [(7 * i + 3) % 200 + 2 for i in range(LONG)]


def test_thousands_of_evictions_in_one_step(model, tmp_path_factory):
    # llama_kv8 at world 2: 2 layers x 4 heads x 8 dims x K,V x 4 bytes = 512 bytes per token per rank
    budget = 512 * LONG  # every short entry, or the long one
    server = start(model, tmp_path_factory, "churn", "--max-batch", "16", "--prefix-cache-bytes", str(budget),
                   "--check-sync")
    try:
        server.wait_ready()
        shorts = [[2 + (i // 200) % 200, 2 + i % 200, *range(3, 3 + SHORT - 2)] for i in range(N_SHORT)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: complete(server, p, 1), shorts))
        assert gauge(server, "prefix_cache_entries") == N_SHORT and gauge(server, "prefix_cache_evictions_total") == 0
        got = complete(server, long_prompt(), 4)
        assert httpx.get(server.url + "/health").status_code == 200, server.stderr()[-3000:]
        blocks = -(-LONG // 64)  # the long prompt's blocks (--prefix-block-tokens 64)
        assert gauge(server, "prefix_cache_entries") == blocks
        assert gauge(server, "prefix_cache_evictions_total") == N_SHORT
        # --check-sync: every rank still agrees on its rows and on the entries it holds
        assert complete(server, shorts[0], 2)["usage"]["prompt_tokens"] == SHORT
    finally:
        server.stop()
        assert not tagged(server.tag)
    cold = start(model, tmp_path_factory, "churn-cold", "--max-batch", "2", "--prefix-cache-bytes", "0")
    try:
        cold.wait_ready()
        want = complete(cold, long_prompt(), 4)
    finally:
        cold.stop()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]


def test_engine_that_dies_turns_health_503_and_exits_nonzero(model, tmp_path_factory, monkeypatch):
    faults = str(Path(__file__).parent / "faults")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([faults, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MLX_KVSHARD_TEST_FAIL_STEP", "0")
    server = start(model, tmp_path_factory, "dies", "--max-batch", "2")
    try:
        server.wait_ready()
        r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": [5, 6, 7], "max_tokens": 3},
                       timeout=120)
        assert r.status_code >= 500 and "injected fault" in r.text, r.text
        rc = server.proc.wait(timeout=120)  # the server ends on its own
        assert rc != 0, server.stderr()[-3000:]
    finally:
        server.stop()
        assert not tagged(server.tag)
    assert "injected fault" in server.stderr()
