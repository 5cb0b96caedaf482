"""The schema is the contract, held by a fuzzer (issue 23): `serve --simulate 2` on `tiny`
publishes /openapi.json (FastAPI's own, with the model's bounds), and schemathesis, driven
by it through real HTTP with a fixed seed and a few examples per operation, finds no 5xx,
no schema-valid request refused and no schema-forbidden request accepted. Afterwards the
server is healthy, its ranks in sync (--check-sync: a difference after any join or removal
stops the engine) and a reference greedy request gives the same text. scripts/fuzz_serve.py
runs the same for as long as asked."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from liveness_procs import tagged
from server_procs import Server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fuzz_serve  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

SEED = 23
EXAMPLES = 4  # per operation in the fuzzing phase; the coverage phase adds its boundary cases


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    s = Server(tmp, ["serve", "--simulate", "2", "--model", "tiny", "--port", "0", *fuzz_serve.SERVE_FLAGS],
               f"fuzz-{os.getpid()}")
    try:
        yield s.wait_ready()
    finally:
        s.stop()
        assert not tagged(s.tag), "rank processes left behind"


def test_the_schema_states_what_validation_does(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()
    comp = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    top_k = next(m for m in comp["top_k"]["anyOf"] if m.get("type") == "integer")
    assert top_k["maximum"] == 507  # tiny's vocabulary is 508
    assert {"type": "string", "minLength": 1} in comp["prompt"]["anyOf"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert all(k.startswith("text/plain") for k in metrics)
    assert "422" not in doc["paths"]["/v1/completions"]["post"]["responses"]  # invalid input is a 400
    # what the schema forbids is a 4xx naming the field; what it allows is served
    for path, body, param in (("/v1/completions", {"prompt": ""}, "prompt"),
                              ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "top_logprobs": 2}, "top_logprobs"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                                  {"type": "image_url"}]}]}, "messages.0.content")):
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for body in ({"messages": [{"role": "tool"}]}, {"messages": [{"role": "assistant", "content": []}]},
                 {"messages": [{"role": "user", "content": "x"}], "seed": -(2**70)},
                 {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2.0}):  # an integer too
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text


def test_fuzzer_finds_nothing_and_the_server_is_unharmed(server, tmp_path):
    out = fuzz_serve.fuzz(server.url, SEED, tmp_path, max_examples=EXAMPLES, phases="coverage,fuzzing")
    assert out.cases > 100, out
    assert not out.failures and out.schemathesis_rc == 0, "\n".join(
        f"{f['code']} {f['title']} {f.get('operations')}\n{f.get('detail', '')}" for f in out.failures)
    assert out.healthy and out.reference_same, out
