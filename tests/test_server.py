"""`mlx-kvshard serve` with real ranks and real HTTP, driven by the official `openai` client
and plain httpx: chat and text completions, streamed and not, at world 1 and 3 (8 KV heads,
split 3,3,2) equal `generate`'s greedy text; 8 concurrent streams each get their own text;
/v1/models, /health, /metrics; every bad input is a 4xx naming the field and no rank sees
it; a full queue is 429; a client that leaves is cancelled on every rank; a rank killed or
stopped mid-stream ends every open request with an error naming it and the server exits 75;
under `launch --restart` the server comes back. Each server starts once per module."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints import checkpoint
from liveness_procs import REPO, alive, env_for, rank_pids, tagged, wait_for
from mlx_kvshard.liveness.client import EXIT_PEER_LOST
from server_procs import Server, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

PEER_TIMEOUT = 5.0
MAX_CONTEXT = 256
KEY = "test-key-123"
NAME = "kv8"  # --served-model-name
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
CHAT_PROMPT = "alpha beta gamma delta"
TEXT_PROMPT = "epsilon zeta eta theta iota"
N_TOKENS = 10
LONG = 4096  # world 1's context: a request of LONG - 100 tokens takes seconds, time to see the queue full


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "llama_kv8")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict:
    """`generate`'s greedy text (one process, world 1) for the chat and the plain prompt."""
    out = {}
    for kind, prompt, flags in (("chat", CHAT_PROMPT, []), ("text", TEXT_PROMPT, ["--no-chat-template"])):
        proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--model", str(model), "--prompt",
                               prompt, "--max-tokens", str(N_TOKENS), "--temp", "0", "--json", *flags],
                              capture_output=True, text=True, timeout=600, env=env_for("server-ref"), cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@contextlib.contextmanager
def serve(model, tmp_path_factory, tag: str, world: int, *flags: str, context: int = MAX_CONTEXT):
    tmp = tmp_path_factory.mktemp(tag)
    server = Server(tmp, ["serve", "--simulate", str(world), "--model", str(model), "--served-model-name", NAME,
                          "--port", "0", "--max-context", str(context), "--peer-timeout", str(PEER_TIMEOUT),
                          *flags], f"{tag}-{os.getpid()}")
    try:
        yield server.wait_ready()
    finally:
        server.stop()
        assert not tagged(server.tag), "rank processes left behind"


@pytest.fixture(scope="module")
def world1(model, tmp_path_factory):
    """One request at a time and no queue (so the second is 429), behind an API key; a long
    context, so one request can run for seconds on this small model."""
    with serve(model, tmp_path_factory, "serve-w1", 1, "--max-batch", "1", "--max-waiting", "0",
               "--api-key", KEY, context=LONG) as server:
        yield server


@pytest.fixture(scope="module")
def world3(model, tmp_path_factory):
    """--check-sync: every rank reports its batch rows and KV bytes after each join/removal."""
    with serve(model, tmp_path_factory, "serve-w3", 3, "--max-body-bytes", "65536", "--check-sync") as server:
        yield server


def client(server: Server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=600)


def metrics(server: Server, key: str | None = None) -> dict:
    """{name: {labels-tuple: value}} from /metrics, parsed with prometheus_client's parser."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(server.url + "/metrics", headers=headers, timeout=30).text
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(m: dict, name: str) -> float:
    return m[name][()]


def per_rank(m: dict, name: str) -> list[float]:
    return [v for _, v in sorted((int(dict(k)["rank"]), v) for k, v in m[name].items())]


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    return text, chunks


def check_api_equals_generate(c: openai.OpenAI, reference: dict) -> None:
    """Chat and completions, streamed and not: `generate`'s greedy text, usage, finish_reason."""
    msgs = [{"role": "user", "content": CHAT_PROMPT}]
    ref = reference["chat"]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=N_TOKENS, temperature=0)
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == ref["finish_reason"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref["prompt_tokens"], len(ref["tokens"]))
    text, chunks = stream_text(c.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=N_TOKENS,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
    assert text == ref["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref["tokens"])

    ref = reference["text"]
    r = c.completions.create(model=NAME, prompt=TEXT_PROMPT, max_tokens=N_TOKENS, temperature=0)
    assert r.choices[0].text == ref["text"] and r.choices[0].finish_reason == ref["finish_reason"]
    assert r.usage.prompt_tokens == ref["prompt_tokens"]
    text, _ = stream_text(c.completions.create(model=NAME, prompt=TEXT_PROMPT, max_tokens=N_TOKENS, temperature=0,
                                               stream=True))
    assert text == ref["text"]


# ---- world 1: auth, equality with generate, queue full -------------------------------------

def test_world1_api_key(world1):
    assert httpx.get(world1.url + "/health").status_code == 200  # open without a key
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(world1.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(world1, "wrong").models.list()
    assert [m.id for m in client(world1, KEY).models.list().data] == [NAME]


def test_world1_chat_and_completions_equal_generate(world1, reference):
    check_api_equals_generate(client(world1, KEY), reference)


def test_world1_queue_full_is_429_with_retry_after(world1):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": words(5), "max_tokens": LONG - 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", world1.url + "/v1/completions", json=body, headers=headers, timeout=600) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # held: a dropped iterator would close the stream (a disconnect)
        next(line for line in lines if line.startswith("data: "))  # it is decoding
        r = httpx.post(world1.url + "/v1/completions", json={**body, "stream": False}, headers=headers, timeout=60)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client(world1, KEY).completions.create(model=NAME, prompt="x", max_tokens=2)
    # leaving cancelled the running request: the slot frees and requests run again
    wait_for(lambda: one(metrics(world1, KEY), "mlx_kvshard_running_requests") == 0, None, 120, "the cancel")
    assert client(world1, KEY).completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0).choices


# ---- world 3 -------------------------------------------------------------------------------

def test_world3_health_models_metrics(world3):
    loading = [body for status, body in world3.health_seen if status == 503]
    assert loading and loading[0]["status"] == "loading", world3.health_seen[:3]  # 503 while the ranks loaded
    h = httpx.get(world3.url + "/health").json()
    assert h["status"] == "ok" and h["world"] == 3 and [r["rank"] for r in h["ranks"]] == [0, 1, 2]
    assert h["model"] == NAME and h["max_context"] == MAX_CONTEXT
    models = client(world3).models.list().data
    assert [m.id for m in models] == [NAME] and client(world3).models.retrieve(NAME).id == NAME
    m = metrics(world3)
    assert one(m, "mlx_kvshard_ready") == 1 and one(m, "mlx_kvshard_world_size") == 3
    assert len(per_rank(m, "mlx_kvshard_kv_tokens_capacity")) == 3
    assert all(v > 0 for v in per_rank(m, "mlx_kvshard_kv_tokens_capacity"))
    for name in ("mlx_kvshard_queue_depth", "mlx_kvshard_running_requests", "mlx_kvshard_prefix_cache_hits_total",
                 "mlx_kvshard_collectives_total", "mlx_kvshard_collective_bytes_total",
                 "mlx_kvshard_last_step_collectives", "mlx_kvshard_time_to_first_token_seconds_count",
                 "mlx_kvshard_time_per_output_token_seconds_count"):
        assert name in m, name


def test_world3_chat_and_completions_equal_generate(world3, reference):
    check_api_equals_generate(client(world3), reference)
    m = metrics(world3)
    assert m["mlx_kvshard_requests_total"][(("endpoint", "chat"), ("outcome", reference["chat"]["finish_reason"]))] >= 2
    assert one(m, "mlx_kvshard_time_to_first_token_seconds_count") >= 4
    assert one(m, "mlx_kvshard_generation_tokens_total") > 0
    assert one(m, "mlx_kvshard_last_step_collectives") > 0 and one(m, "mlx_kvshard_collective_bytes_total") > 0


def test_world3_eight_concurrent_streams_each_get_their_own_text(world3):
    c = client(world3)
    asks = [dict(prompt=words(3 + i, i), max_tokens=6 + i, temperature=0) for i in range(8)]
    asks[2].update(temperature=0.8, seed=7)  # sampled, seeded: the same alone as in a batch
    asks[5].update(temperature=1.0, top_p=0.9, seed=3)
    alone = [c.completions.create(model=NAME, **a).choices[0].text for a in asks]
    assert len(set(alone)) == len(alone), alone  # different texts, so a mix-up would show
    got = [None] * len(asks)

    def run(i: int) -> None:
        got[i] = stream_text(c.completions.create(model=NAME, stream=True, **asks[i]))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert got == alone


def test_world3_prefix_cache_and_logprobs(world3):
    c = client(world3)
    shared = words(30)
    c.completions.create(model=NAME, prompt=shared + " one", max_tokens=2, temperature=0)
    r = c.completions.create(model=NAME, prompt=shared + " two three", max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert one(metrics(world3), "mlx_kvshard_prefix_cache_hits_total") >= 1
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 for t in content)
    r = c.completions.create(model=NAME, prompt="hi", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and all(len(t) <= 2 for t in lp.top_logprobs)


BAD = [  # (what, path, body, status, param)
    ("invalid JSON", "/v1/chat/completions", b"{\"messages\": [", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     400, "temperature"),
    ("out of range", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("zero max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("prompt type", "/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("n > 1", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("unknown model", "/v1/completions", {"model": "gpt-4o", "prompt": "x"}, 404, "model"),
    ("past the context", "/v1/completions", {"prompt": words(MAX_CONTEXT + 20)}, 400, "prompt"),
    ("token past the vocabulary", "/v1/completions", {"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("body too large", "/v1/completions", {"prompt": "x" * 70000}, 413, None),
]


def test_world3_bad_input_is_a_4xx_naming_the_field_and_no_rank_sees_it(world3):
    before = metrics(world3)
    for what, path, body, status, param in BAD:
        kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = httpx.post(world3.url + path, timeout=60, **kw)
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], (what, err)
        if param:
            assert param in err["message"] or "prompt" in err["message"], (what, err)
    assert r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the bytes are counted as they arrive
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(world3.url + "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError):
        client(world3).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client(world3).completions.create(model=NAME, prompt=words(MAX_CONTEXT + 20))
    after = metrics(world3)
    for name in ("mlx_kvshard_engine_steps_total", "mlx_kvshard_collectives_total"):  # no rank saw any of it
        assert one(after, name) == one(before, name), name
    assert client(world3).completions.create(model=NAME, prompt="still serving", max_tokens=2).choices


def test_world3_client_disconnect_cancels_on_every_rank(world3):
    body = {"prompt": words(6), "max_tokens": 200, "temperature": 0, "stream": True}
    cancelled = metrics(world3)["mlx_kvshard_requests_total"].get((("endpoint", "completions"),
                                                                   ("outcome", "cancelled")), 0)
    with httpx.stream("POST", world3.url + "/v1/completions", json=body, timeout=600) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(lines)
        m = metrics(world3)
        assert per_rank(m, "mlx_kvshard_audited_batch_rows") == [1, 1, 1]  # joined on every rank
        assert all(b > 0 for b in per_rank(m, "mlx_kvshard_audited_kv_bytes"))
    # the client left mid-stream
    wait_for(lambda: one(metrics(world3), "mlx_kvshard_running_requests") == 0, None, 120, "the cancel")
    m = metrics(world3)
    assert m["mlx_kvshard_requests_total"][(("endpoint", "completions"), ("outcome", "cancelled"))] == cancelled + 1
    assert per_rank(m, "mlx_kvshard_audited_batch_rows") == [0, 0, 0]  # every rank reported it removed
    assert per_rank(m, "mlx_kvshard_audited_kv_bytes") == [0, 0, 0]  # and its KV freed
    assert per_rank(m, "mlx_kvshard_kv_tokens_used") == [0, 0, 0]


def fault_mid_stream(server: Server, world: int, victim: int, sig: int) -> None:
    """Signal rank `victim` while one request streams and one waits for its whole answer:
    the stream ends with an error event naming the rank, the other gets a 5xx naming it,
    the server exits 75 within the liveness bounds and no rank process is left."""
    pids = rank_pids(server.tag, world)
    body = {"model": NAME, "prompt": words(5), "max_tokens": 200, "temperature": 0}
    events, plain, failures = [], {}, []

    def streamer():
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                              timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as e:
            failures.append(e)

    def waiter():
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
        plain.update(status=r.status_code, body=r.json())

    threads = [threading.Thread(target=streamer), threading.Thread(target=waiter)]
    for t in threads:
        t.start()
    wait_for(lambda: len(events) >= 4, server.proc, 300, "tokens streaming")
    t0 = time.monotonic()
    os.kill(pids[victim], sig)
    for t in threads:
        t.join(timeout=PEER_TIMEOUT + 60)
    rc = server.proc.wait(timeout=PEER_TIMEOUT + 60)
    exit_s = time.monotonic() - t0
    name = f"rank {victim}"
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert errors and name in errors[0]["message"], (events[-3:], failures, server.stderr()[-3000:])
    assert plain["status"] >= 500 and name in plain["body"]["error"]["message"], plain
    assert rc == EXIT_PEER_LOST, server.stderr()[-3000:]
    assert exit_s < PEER_TIMEOUT + 30
    time.sleep(0.5)
    assert [p for p in pids.values() if alive(p)] == []


def test_world3_rank_killed_mid_stream(world3):
    """Last on this server: it ends it."""
    fault_mid_stream(world3, 3, 2, signal.SIGKILL)


def test_rank_stalled_mid_stream(model, tmp_path_factory):
    """A stopped (not dead) rank: only its silence on the side channel tells."""
    with serve(model, tmp_path_factory, "serve-stall", 2) as server:
        fault_mid_stream(server, 2, 1, signal.SIGSTOP)


# ---- launch --restart ------------------------------------------------------------------------

def test_launch_restart_brings_the_server_back(model, tmp_path):
    port = free_port()
    tag = f"serve-restart-{os.getpid()}"
    server = Server(tmp_path, ["launch", "--simulate", "2", "--restart", "1", "--skip-check", "--", "serve",
                               "--model", str(model), "--port", str(port), "--peer-timeout", str(PEER_TIMEOUT)],
                    tag, port=port)
    try:
        server.wait_ready()
        first = rank_pids(tag, 2)
        os.kill(first[1], signal.SIGKILL)
        wait_for(lambda: server.health() != 200, server.proc, PEER_TIMEOUT + 60, "the server to go down")
        wait_for(lambda: server.health() == 200, server.proc, 600, "the relaunched server")
        assert rank_pids(tag, 2)[1] != first[1]  # a new group (rank 0 may read as the launcher: same tag)
        r = client(server).completions.create(model=str(model), prompt="back", max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert "restart 1/1" in server.stderr()
    finally:
        server.stop()
    assert not tagged(tag)


@pytest.mark.parametrize("flags, message", [
    (["--api-key", ""], "--api-key is empty"),
    (["--port", "70000"], "--port 70000"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--restart", "1"], "--restart relaunches ranks"),
])
def test_serve_usage_errors_exit_2_before_anything_starts(flags, message):
    proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "serve", *flags], capture_output=True, text=True,
                          timeout=120, env=env_for("serve-usage"), cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr and "HTTP on" not in proc.stderr, proc.stderr
