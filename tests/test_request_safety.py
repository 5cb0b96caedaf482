"""A bad request fails alone (issue 23): `serve --simulate 2` on `tiny` through real HTTP.
A sampling parameter the model cannot honour (top_k at or past the vocabulary) is a 400
naming the field before any rank sees it, and the server goes on serving."""

from __future__ import annotations

import os
import sys

import httpx
import pytest

from liveness_procs import tagged
from server_procs import Server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

TINY_VOCAB = 508
REFERENCE = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    server = Server(tmp, ["serve", "--simulate", "2", "--model", "tiny", "--port", "0", "--max-context", "256",
                          "--peer-timeout", "5", "--check-sync"], f"safety-{os.getpid()}")
    try:
        yield server.wait_ready()
    finally:
        server.stop()
        assert not tagged(server.tag), "rank processes left behind"


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def steps(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("mlx_kvshard_engine_steps_total ")))


@pytest.mark.parametrize("top_k", [TINY_VOCAB, 600, 128_256])
def test_top_k_at_or_past_the_vocabulary_is_a_400_and_the_server_goes_on(world2, top_k):
    ref = post(world2, "/v1/completions", REFERENCE).json()["choices"][0]["text"]
    before = steps(world2)
    for path, body in (("/v1/completions", {"prompt": "hello"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})):
        r = post(world2, path, {**body, "temperature": 0.8, "top_k": top_k, "max_tokens": 4})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "top_k" and str(TINY_VOCAB) in err["message"], err
    assert steps(world2) == before  # refused before any rank saw it
    ok = post(world2, "/v1/completions", {"prompt": "hello", "temperature": 0.8, "top_k": TINY_VOCAB - 1,
                                          "max_tokens": 4, "seed": 1})
    assert ok.status_code == 200, ok.text
    assert httpx.get(world2.url + "/health", timeout=30).status_code == 200
    assert post(world2, "/v1/completions", REFERENCE).json()["choices"][0]["text"] == ref
