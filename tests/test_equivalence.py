"""Sharded output equals the unsharded mlx-lm model on the same weights, for every world
size we claim, with real rank processes."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from checkpoints import checkpoint
from equiv_rank import N_TOKENS, PROMPT
from mlx_kvshard.models.architectures import load_oracle
from ranks import mlx_launch

# (world, vocab-parallel lm_head) -> checkpoints run that way
RUNS = {
    (1, False): ["llama_g2", "qwen3_qknorm"],
    (2, False): ["llama_g2", "qwen2_bias", "qwen3_qknorm", "mistral", "bf16", "q4", "q8", "q_mixed", "mxfp4"],
    (3, False): ["llama_g2", "llama_g4_tied_rope", "llama_kv8", "q4", "q_mixed"],
    (4, False): ["llama_g2", "llama_g4_tied_rope", "q4"],
    # 6 > 4 KV heads: shared heads, 2,2,1,1 ranks per head (8 ranks on 4 KV heads: test_cli.py)
    (6, False): ["llama_g2", "llama_g4_tied_rope"],
    (3, True): ["llama_g2", "llama_g4_tied_rope", "q4", "q4_tied", "q_mixed"],  # untied, tied, quantized
}
TOLERANCE = {"q4": 1e-3, "q8": 1e-3, "q4_tied": 1e-3, "q_mixed": 1e-3, "mxfp4": 1e-3}  # quantized matmuls sum in another order per shard
_oracle_cache: dict = {}


def oracle(path):
    """Last-token logits and 32 greedy tokens from mlx-lm's own unsharded model."""
    if path not in _oracle_cache:
        model = load_oracle(path, mx.float32)
        logits = model(mx.array(PROMPT)[None])[0, -1]
        sampler = lambda lp: mx.argmax(lp, axis=-1)
        tokens = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=N_TOKENS, sampler=sampler)]
        _oracle_cache[path] = (np.array(logits), tokens)
    return _oracle_cache[path]


@pytest.mark.parametrize("world,vocab_parallel", sorted(RUNS), ids=lambda v: str(v))
def test_sharded_matches_unsharded(world, vocab_parallel, ckpt_root, tmp_path):
    names = RUNS[world, vocab_parallel]
    dirs = [checkpoint(ckpt_root, n) for n in names]
    flags = ["--vocab-parallel"] if vocab_parallel else []
    mlx_launch(world, [str(__import__("equiv_rank").__file__), str(tmp_path), *map(str, dirs), *flags])
    for name, d in zip(names, dirs):
        got = np.load(tmp_path / f"{name}.npz")
        want_logits, want_tokens = oracle(d)
        err = float(np.max(np.abs(got["logits"] - want_logits)))
        assert err < TOLERANCE.get(name, 1e-4), f"{name} world {world}: max |logit diff| {err}"
        assert got["tokens"].tolist() == want_tokens, f"{name} world {world}: greedy tokens differ"
        facts = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(world)]
        for f in facts:
            # each rank's cache and k_proj hold exactly its own KV heads, sized as planned
            assert f["k_proj_is_own_heads"], f
            assert f["cache_kv_heads"] == f["kv_heads"][1] - f["kv_heads"][0]
            assert f["kv_bytes"] == f["kv_tokens_allocated"] * f["plan_kv_bytes_per_token"]
            # the plan's weight bytes are what the rank holds (per-module quantization included),
            # where loading in float32 keeps the checkpoint's dtype
            if json.loads((d / "config.json").read_text())["torch_dtype"] == "float32":
                assert f["param_bytes"] == f["plan_weight_bytes"], (name, f)
        owned = sorted(h for f in facts for h in range(*f["kv_heads"]))
        n_kv = json.loads((d / "config.json").read_text())["num_key_value_heads"]
        if world <= n_kv:  # no sharing: every KV head held by exactly one rank
            assert owned == list(range(n_kv))
        else:  # shared: every KV head held by at least one rank
            assert sorted(set(owned)) == list(range(n_kv))
