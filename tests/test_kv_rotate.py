"""Hadamard-rotated KV (the default for --kv-bits 4) in the serving engine: a staggered batch
at world 3 (rows joining a running batch, a prompt longer than --prefill-step, a prefix-cache
hit) gives every request the tokens one-prompt `generate` gives it alone at world 1."""

from __future__ import annotations

import json

from checkpoints import checkpoint
from test_engine_kv import COMMON, REQUESTS, run

KV4 = ["--kv-bits", "4", "--kv-group-size", "32"]  # kvq: head_dim 64; rotated by default


def test_rotated_4bit_batch_at_world3_equals_one_prompt_at_world1(ckpt_root, tmp_path):
    model = checkpoint(ckpt_root, "kvq")  # 4 KV heads: world 3 holds 2, 1, 1
    f = tmp_path / "requests.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    proc = run("rot-batch", ["--model", str(model), "--prompts-file", str(f), "--check-sync", *COMMON, *KV4], 3)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    results = {r["index"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert results[4]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the prefix hit happened
    for i, req in enumerate(REQUESTS):
        one = run("rot-one", ["--model", str(model), "--prompt", req["prompt"], "--max-tokens", str(req["max_tokens"]),
                              "--json", *COMMON, *KV4], 1)
        assert one.returncode == 0, one.stderr[-3000:]
        report = json.loads(one.stdout)
        assert report["ranks"][0]["kv_rotated"]
        assert results[i]["tokens"] == report["tokens"], f"request {i}"
