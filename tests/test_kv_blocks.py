"""The prefix cache's shared blocks. At world 2 through real HTTP: chats on one long system
prompt, sent together, store it once and hit it (cached_tokens), and their greedy text
equals a cold server's (no prefix cache); --check-sync has every rank agree on its blocks.
In process: concurrent requests hitting shared blocks get the mlx-lm oracle's tokens."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from checkpoints import checkpoint
from liveness_procs import tagged
from mlx_kvshard.models.architectures import load_oracle
from server_procs import Server
from test_kv_churn import complete, gauge

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

BLOCK = 32
SYSTEM = [(11 * i + 5) % 250 + 2 for i in range(4 * BLOCK + 7)]  # 4 whole blocks and a part of one
QUESTIONS = [[3 + q, 4 + q, 5, 6, 7 + q] for q in range(6)]
N_TOKENS = 6


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "llama_kv8")


def oracle(model_dir, prompt: list[int]) -> list[int]:
    lm = load_oracle(model_dir, mx.float32)
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    return [int(t) for t, _ in generate_step(mx.array(prompt), lm, max_tokens=N_TOKENS, sampler=greedy)]


def run_server(model, tmp_path, tag: str, *flags: str) -> tuple[list[dict], float]:
    """The first chat alone (its blocks go in), then the others together; the blocks held."""
    server = Server(tmp_path, ["serve", "--simulate", "2", "--model", str(model), "--served-model-name", "m",
                               "--port", "0", "--max-context", "512", "--peer-timeout", "5", "--max-batch", "4",
                               *flags], f"{tag}-{os.getpid()}")
    try:
        server.wait_ready()
        first = complete(server, SYSTEM + QUESTIONS[0], N_TOKENS)
        with ThreadPoolExecutor(4) as pool:
            rest = list(pool.map(lambda q: complete(server, SYSTEM + q, N_TOKENS), QUESTIONS[1:]))
        blocks = gauge(server, "prefix_cache_entries")
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
        assert not tagged(server.tag)
    return [first, *rest], blocks


def test_concurrent_chats_share_the_system_prompt_blocks(model, tmp_path):
    got, blocks = run_server(model, tmp_path, "kvblocks", "--prefix-block-tokens", str(BLOCK), "--check-sync")
    assert got[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    for r in got[1:]:  # every later chat reused the whole system prompt, its partial block too
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(SYSTEM), r["usage"]
    # stored once: the system prompt's 5 blocks, then a short tail block or two per chat
    assert blocks <= 5 + 2 * len(QUESTIONS), blocks
    cold, _ = run_server(model, tmp_path, "kvblocks-cold", "--prefix-cache-bytes", "0")
    assert [r["choices"][0]["text"] for r in got] == [r["choices"][0]["text"] for r in cold]


def test_shared_blocks_equal_the_oracle_in_process(model):
    from mlx_kvshard.serving.requests import Request
    from test_engine_api import greedy, with_engine

    def together(engine):
        engine.generate(Request(prompt_ids=SYSTEM + QUESTIONS[0], params=greedy(N_TOKENS)))
        handles = [engine.submit(Request(prompt_ids=SYSTEM + q, params=greedy(N_TOKENS))) for q in QUESTIONS[1:]]
        return [h.result() for h in handles]

    done = with_engine(model, together, max_batch=4, prefix_block_tokens=BLOCK)
    assert all(c.usage.cached_tokens >= len(SYSTEM) for c in done)
    assert [c.tokens for c in done] == [oracle(model, SYSTEM + q) for q in QUESTIONS[1:]]
