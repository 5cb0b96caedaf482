"""Hadamard-rotated 4-bit KV with a full-precision window of the last 8 positions in the
serving engine: a staggered batch at world 3 (rows joining a running batch, prompts longer
than --prefill-step, a prefix-cache hit) gives every request but the hit the tokens
one-prompt `generate` gives it alone at world 1. The hit starts from blocks whose positions
were stored quantized, some of which a cold prefill still holds in full precision (docs:
README "KV cache"): it runs, in sync on every rank."""

from __future__ import annotations

import json

from checkpoints import checkpoint
from test_engine_kv import COMMON, REQUESTS, run

KV4 = ["--kv-bits", "4", "--kv-group-size", "32", "--kv-fp-window", "8"]  # kvq: head_dim 64; rotated by default
HIT = 4


def test_windowed_4bit_batch_at_world3_equals_one_prompt_at_world1(ckpt_root, tmp_path):
    model = checkpoint(ckpt_root, "kvq")  # 4 KV heads: world 3 holds 2, 1, 1
    f = tmp_path / "requests.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    proc = run("rot-batch", ["--model", str(model), "--prompts-file", str(f), "--check-sync", *COMMON, *KV4], 3)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    results = {r["index"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert results[HIT]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the prefix hit happened
    assert len(results[HIT]["tokens"]) == REQUESTS[HIT]["max_tokens"]
    for i, req in enumerate(REQUESTS):
        if i == HIT:
            continue
        one = run("rot-one", ["--model", str(model), "--prompt", req["prompt"], "--max-tokens", str(req["max_tokens"]),
                              "--json", *COMMON, *KV4], 1)
        assert one.returncode == 0, one.stderr[-3000:]
        report = json.loads(one.stdout)
        assert report["ranks"][0]["kv_rotated"] and report["ranks"][0]["kv_fp_window"] == 8
        assert results[i]["tokens"] == report["tokens"], f"request {i}"
