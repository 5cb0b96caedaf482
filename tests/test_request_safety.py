"""A bad request fails alone (issue 23): `serve --simulate 2` on `tiny` through real HTTP
(--check-sync: every rank reports its rows and KV after each join and removal).
- A sampling parameter the model cannot honour (top_k at or past the vocabulary) is a 400
  naming the field before any rank sees it, and the server goes on serving.
- Log-probabilities an extreme repetition_penalty makes non-finite are reported as -9999.0.
- A failure injected into one request's row work (its sampler, its token's processing)
  while 8 requests run ends that request alone (a 500 or an SSE error event); the other 7
  get the oracle's tokens, /health stays 200, the ranks stay in sync."""

from __future__ import annotations

import json
import math
import os
import sys
import threading

import httpx
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import load as load_tokenizer

from liveness_procs import tagged
from mlx_kvshard.models.architectures import load_oracle
from mlx_kvshard.models.tiny import tiny_model_dir
from mlx_kvshard.serving.sampling import LOGPROB_FLOOR, TEST_FAIL_ROW
from server_procs import Server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

TINY_VOCAB = 508
REFERENCE = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
FAIL_SAMPLE, FAIL_TEXT = 424242, 434343  # seeds the test hook fails: in sampling at token 2, in its text at 3
PROMPTS = [f"request {i}: " + " ".join(["alpha", "beta", "gamma", "delta", "eps"][: 1 + i % 5]) for i in range(8)]
N_TOKENS = 10


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    server = Server(tmp, ["serve", "--simulate", "2", "--model", "tiny", "--port", "0", "--max-context", "256",
                          "--peer-timeout", "5", "--check-sync"], f"safety-{os.getpid()}",
                    env={TEST_FAIL_ROW: f"{FAIL_SAMPLE}:2:sample,{FAIL_TEXT}:3:text"})
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


def finite_logprobs(values) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) and LOGPROB_FLOOR <= v <= 0 for v in values)


def test_non_finite_logprobs_clamp_to_the_floor(world2):
    """repetition_penalty 5e-324 (legal: > 0) is 0 in float32: the penalized logits become
    inf and the log-probabilities NaN; the response reports them as -9999.0."""
    body = {"prompt": "alpha alpha alpha alpha", "max_tokens": 6, "temperature": 0, "repetition_penalty": 5e-324}
    r = post(world2, "/v1/completions", {**body, "logprobs": 3})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert finite_logprobs(lp["token_logprobs"]) and LOGPROB_FLOOR in lp["token_logprobs"], lp
    assert all(finite_logprobs(top.values()) for top in lp["top_logprobs"])
    r = post(world2, "/v1/chat/completions", {"messages": [{"role": "user", "content": body["prompt"]}],
                                              "max_tokens": 6, "temperature": 0.9, "seed": 5,
                                              "repetition_penalty": 5e-324, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert finite_logprobs([t["logprob"] for t in content] + [a["logprob"] for t in content for a in t["top_logprobs"]])
    with httpx.stream("POST", world2.url + "/v1/completions", json={**body, "logprobs": 2, "stream": True},
                      timeout=120) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [v for e in events for c in e["choices"] if c.get("logprobs") for v in c["logprobs"]["token_logprobs"]]
    assert len(streamed) == 6 and finite_logprobs(streamed), events
    assert httpx.get(world2.url + "/health", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def oracle() -> list[list[str]]:
    """mlx-lm's unsharded model (float32, greedy): each prompt's tokens, as the pieces the
    completions logprobs report (one per token)."""
    d = tiny_model_dir()
    tok, model = load_tokenizer(d), load_oracle(d, mx.float32)
    out = []
    for p in PROMPTS:
        steps_ = generate_step(mx.array(tok.encode(p)), model, max_tokens=N_TOKENS,
                               sampler=lambda lp: mx.argmax(lp, axis=-1))
        out.append([tok.decode([int(t)]) for t, _ in steps_])
    return out


def eight_with_one_failing(server: Server, fail_seed: int, stream: bool) -> list:
    """8 concurrent completions; request 3 is sampled with `fail_seed` (the test hook fails
    it), the others greedy. Each result: the token pieces, or (status, error) for a failure."""
    got: list = [None] * len(PROMPTS)

    def run(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": N_TOKENS, "temperature": 0, "logprobs": 0}
        if i == 3:
            body.update(temperature=0.7, seed=fail_seed, stream=stream)
        if body.get("stream"):
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            got[i] = (r.status_code, [e["error"] for e in events if "error" in e])
            return
        r = post(server, "/v1/completions", body)
        got[i] = r.json()["choices"][0]["logprobs"]["tokens"] if r.status_code == 200 else (r.status_code,
                                                                                            r.json()["error"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return got


@pytest.mark.parametrize("fail_seed,stream", [(FAIL_SAMPLE, True), (FAIL_TEXT, False)])
def test_a_failing_row_ends_its_request_alone(world2, oracle, fail_seed, stream):
    ref = post(world2, "/v1/completions", REFERENCE).json()["choices"][0]["text"]
    got = eight_with_one_failing(world2, fail_seed, stream)
    for i, want in enumerate(oracle):
        if i != 3:
            assert got[i] == want, (i, got[i], want)
    status, error = got[3]
    if stream:  # the stream had begun (200): it ends with an error event
        assert status == 200 and len(error) == 1, got[3]
        error = error[0]
    else:
        assert status == 500, got[3]
    assert error["code"] == "request_failed" and f"seed {fail_seed} fails" in error["message"], error
    assert httpx.get(world2.url + "/health", timeout=30).status_code == 200
    text = httpx.get(world2.url + "/metrics", timeout=30).text
    assert 'mlx_kvshard_requests_total{endpoint="completions",outcome="error"}' in text
    assert post(world2, "/v1/completions", REFERENCE).json()["choices"][0]["text"] == ref


def joined(server: Server, path: str, body: dict) -> str:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for e in events for c in e["choices"])


def test_completion_text_keeps_its_leading_space_and_streams_to_the_same_text(world2):
    """Issue 16 part 4: tiny's greedy answer to "alpha beta" starts with " quick"."""
    d = tiny_model_dir()
    tok, model = load_tokenizer(d), load_oracle(d, mx.float32)
    body = {"prompt": "alpha beta", "max_tokens": 8, "temperature": 0}
    r = post(world2, "/v1/completions", body).json()
    n = r["usage"]["completion_tokens"]
    want = [int(t) for t, _ in generate_step(mx.array(tok.encode(body["prompt"])), model, max_tokens=n,
                                             sampler=lambda lp: mx.argmax(lp, axis=-1))]
    text = r["choices"][0]["text"]
    assert text == tok.decode(want) and text.startswith(" "), (text, tok.decode(want))
    assert joined(world2, "/v1/completions", body) == text
    chat = {"messages": [{"role": "user", "content": "alpha beta"}], "max_tokens": 8, "temperature": 0}
    content = post(world2, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    assert joined(world2, "/v1/chat/completions", chat) == content and not content.startswith(" ")
