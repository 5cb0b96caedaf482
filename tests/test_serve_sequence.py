"""Sequence-sharded KV in the serving engine (real ranks, float32; seq_kv2: 2 KV heads, so at
world 4 each head's positions are split over 2 ranks). `serve --kv-shard sequence` with
uneven --shares: concurrent requests of mixed lengths (one longer than --prefill-step), a
prefix-cache hit and prompt-lookup verify steps each get the mlx-lm oracle's greedy tokens
and log-probabilities; each rank's admission capacity is its positions over its share of
the sequence. `generate --prompts-file` with --kv-bits 8 at world 3 (head 0 split over two
ranks, head 1 whole on the third) gives mlx-lm's quantized-cache tokens, batched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache
from mlx_lm.tokenizer_utils import load as load_tokenizer

from checkpoints import checkpoint
from liveness_procs import REPO, env_for, reap, tagged
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.models.architectures import load_oracle
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.settings import KVSettings
from server_procs import Server
from test_server import client, metrics, one, per_rank

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")

SHARES = [3, 1, 1, 2]  # head 0 on ranks 0,1 split 3:1; head 1 on ranks 2,3 split 1:2
SHARED = [(5 * i + 7) % 300 + 20 for i in range(34)]  # a prefix the hit reuses (2 blocks of 16)
CONCURRENT = [
    ([11, 12, 13, 14, 15], 12),
    ([(7 * i + 3) % 300 + 20 for i in range(41)], 8),  # longer than --prefill-step 16: 3 chunks
    (SHARED + [40, 41, 42], 6),
    ([(11 * i + 1) % 300 + 20 for i in range(23)], 10),
]
HIT = (SHARED + [50, 51], 6)  # after the third: its first 34 positions come from the prefix cache
REPEAT = ([30, 31, 32, 33] * 6, 12)  # alone, with prompt lookup: verify steps propose from the repeats
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
PROMPTS = [("alpha beta gamma", 10), (" ".join(WORDS[3:] + WORDS[:5]), 8), ("kappa lambda mu nu", 7)]
FLAGS = ["--dtype", "float32", "--prefill-step", "16", "--max-context", "256", "--prefix-block-tokens", "16",
         "--check-sync"]


def greedy_oracle(model, prompt: list[int], n: int, cache=None) -> tuple[list[int], list[float]]:
    """mlx-lm on the unsharded model: greedy tokens and each one's log-probability."""
    out = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1),
                        prefill_step_size=16, prompt_cache=cache)
    pairs = [(int(t), float(lp[t])) for t, lp in out]
    return [t for t, _ in pairs], [p for _, p in pairs]


@pytest.fixture(scope="module")
def model(ckpt_root):
    return checkpoint(ckpt_root, "seq_kv2")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-seq")
    s = Server(tmp, ["serve", "--simulate", "4", "--model", str(model), "--port", "0", "--served-model-name", "m",
                     "--kv-shard", "sequence", "--shares", ",".join(map(str, SHARES)), "--prompt-lookup", "2",
                     "--num-draft", "3", "--peer-timeout", "10", *FLAGS], f"serve-seq-{os.getpid()}")
    try:
        yield s.wait_ready()
    finally:
        s.stop()
        assert not tagged(s.tag), "rank processes left behind"


def complete(c, prompt: list[int], n: int):
    r = c.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, logprobs=1)
    return r, r.choices[0].logprobs.token_logprobs


def test_serve_sequence_sharded_equals_the_oracle(server, model):
    oracle, tokenizer = load_oracle(model, mx.float32), load_tokenizer(model)
    c = client(server)
    got: dict[int, tuple] = {}

    def run(i: int) -> None:
        got[i] = complete(c, *CONCURRENT[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CONCURRENT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got["hit"] = complete(c, *HIT)
    before = metrics(server)
    got["repeat"] = complete(c, *REPEAT)
    after = metrics(server)
    cases = {**dict(enumerate(CONCURRENT)), "hit": HIT, "repeat": REPEAT}
    for key, (prompt, n) in cases.items():
        r, logprobs = got[key]
        want, want_lp = greedy_oracle(oracle, prompt, n)
        assert r.usage.completion_tokens == n and r.choices[0].text == tokenizer.decode(want), key
        assert max(abs(a - b) for a, b in zip(logprobs, want_lp)) < 1e-4, (key, logprobs, want_lp)
    assert got["hit"][0].usage.prompt_tokens_details.cached_tokens == len(SHARED)  # a block and a part of one
    drafted = "mlx_kvshard_speculative_drafted_tokens_total"
    assert one(after, drafted) > one(before, drafted)  # the lone request verified proposals

    # admission: each rank's positions over its share of a sequence, less one cycle's slots per row
    plan = ShardPlan.build(ModelConfig.from_file(model), 4, SHARES, compute_dtype="float32",
                           kv=KVSettings(shard="sequence"))
    positions = per_rank(after, "mlx_kvshard_kv_positions_capacity")
    tokens = per_rank(after, "mlx_kvshard_kv_tokens_capacity")
    for s, p, t in zip(plan.shards, positions, tokens):
        assert t / p == pytest.approx(len(s.seq_cycle) / len(s.seq_slots), rel=1e-3), (s, p, t)
    assert one(after, "mlx_kvshard_kv_tokens_admission_capacity") == min(tokens)
    assert per_rank(after, "mlx_kvshard_kv_tokens_used") == [0, 0, 0, 0]  # every row's KV freed


def test_prompts_file_sequence_sharded_quantized_kv(model, tmp_path):
    """--kv-bits 8 on sequence shards at world 3 (even shares; the rank alone on its head keeps
    a left-padded quantized batch beside the sharers' shares), batched with a prompt longer
    than --prefill-step: mlx-lm's own 8-bit QuantizedKVCache gives the same greedy tokens."""
    f = tmp_path / "requests.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "max_tokens": n}) + "\n" for p, n in PROMPTS))
    tag = f"seq-q8-{os.getpid()}"
    try:
        proc = subprocess.run([sys.executable, "-m", "mlx_kvshard", "generate", "--model", str(model),
                               "--prompts-file", str(f), "--simulate", "3", "--kv-shard", "sequence",
                               "--kv-bits", "8", "--kv-group-size", "32", "--no-chat-template", "--peer-timeout",
                               "10", *FLAGS],
                              capture_output=True, text=True, timeout=600, env=env_for(tag), cwd=REPO,
                              start_new_session=True)
    finally:
        reap(tag, None)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    results = {r["index"]: r for r in map(json.loads, proc.stdout.splitlines())}
    oracle, tokenizer = load_oracle(model, mx.float32), load_tokenizer(model)
    for i, (prompt, n) in enumerate(PROMPTS):
        cache = [QuantizedKVCache(group_size=32, bits=8) for _ in oracle.layers]
        assert results[i]["tokens"] == greedy_oracle(oracle, tokenizer.encode(prompt), n, cache)[0], i
