"""Quantized KV cache (--kv-bits): each rank quantizes its own heads, so world 3 equals world 1
and both equal mlx-lm's own QuantizedKVCache on the unsharded model; KV bytes per rank are
the plan's formula; 8-bit stays close to full precision."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache

from checkpoints import checkpoint
from equiv_rank import PROMPT
from mlx_kvshard.models.architectures import load_oracle
from ranks import mlx_launch

N_TOKENS = 32
STEP = 5  # prefill chunks: the 12-token prompt takes three
RUNS = [
    {"name": "fp"},
    {"name": "q8", "bits": 8},
    {"name": "q4", "bits": 4},
    {"name": "q4g32", "bits": 4, "group_size": 32},
    {"name": "q8late", "bits": 8, "quant_start": 8},  # full precision until 8 tokens, as mlx-lm's
]


@pytest.fixture(scope="module")
def worlds(ckpt_root, tmp_path_factory):
    model = checkpoint(ckpt_root, "kvq")
    runs = [{**r, "model": str(model), "prefill_step": STEP, "tokens": N_TOKENS} for r in RUNS]
    out = {}
    for world in (1, 3):
        d = tmp_path_factory.mktemp(f"kvq{world}")
        mlx_launch(world, [__import__("kv_rank").__file__, str(d), json.dumps(runs)])
        out[world] = d
    return model, out


def load(d, name, world):
    got = np.load(d / f"{name}.npz")
    facts = [json.loads((d / f"{name}.rank{r}.json").read_text()) for r in range(world)]
    return got["logits"], got["tokens"].tolist(), facts


def mlx_lm_quantized(model_dir, bits, group_size, quant_start):
    """mlx-lm on the unsharded model: QuantizedKVCache from the first token, or its own
    quantized_kv_start conversion."""
    model = load_oracle(Path(model_dir), mx.float32)
    make = lambda: [QuantizedKVCache(group_size=group_size, bits=bits) for _ in model.layers]  # noqa: E731
    cache = make()
    for start in range(0, len(PROMPT), STEP):
        logits = model(mx.array(PROMPT[start:start + STEP])[None], cache=cache)
    kw = dict(kv_bits=bits, kv_group_size=group_size, quantized_kv_start=quant_start) if quant_start else \
        dict(prompt_cache=make())
    argmax = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    tokens = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=N_TOKENS, sampler=argmax,
                                               prefill_step_size=STEP, **kw)]
    return np.array(logits[0, -1]), tokens


@pytest.mark.parametrize("run", [r for r in RUNS if "bits" in r], ids=lambda r: r["name"])
def test_world3_equals_world1_and_mlx_lm(worlds, run):
    model, dirs = worlds
    l1, t1, _ = load(dirs[1], run["name"], 1)
    l3, t3, facts = load(dirs[3], run["name"], 3)
    assert t3 == t1, f"{run['name']}: world 3 tokens differ from world 1"
    assert float(np.max(np.abs(l3 - l1))) < 1e-4
    if run.get("quant_start") is None:  # quantized from the first token: only the logits can be compared
        want_logits, want_tokens = mlx_lm_quantized(model, run["bits"], run.get("group_size", 64), 0)
        assert float(np.max(np.abs(l1 - want_logits))) < 1e-4
    else:
        _, want_tokens = mlx_lm_quantized(model, run["bits"], run.get("group_size", 64), run["quant_start"])
    assert t1 == want_tokens, f"{run['name']}: tokens differ from mlx-lm's quantized KV cache"
    for f in facts:  # measured bytes = allocated positions x the plan's bytes per position
        assert f["kv_bytes"] == f["kv_positions_allocated"] * f["plan_kv_bytes_per_position"]
        assert f["plan_kv_bytes"] == f["kv_tokens"] * f["plan_kv_bytes_per_position"]


def test_kv_bytes_follow_the_bit_width(worlds):
    _, dirs = worlds
    per = {r["name"]: load(dirs[3], r["name"], 3)[2][0]["plan_kv_bytes_per_position"] for r in RUNS}
    # rank 0 holds 2 KV heads x head_dim 64 x 2 layers, K and V: 512 elements
    assert per["fp"] == 512 * 4
    assert per["q8"] == 512 + 512 // 64 * 2 * 4 and per["q4"] == 256 + 512 // 64 * 2 * 4
    assert per["q4g32"] == 256 + 512 // 32 * 2 * 4


def test_8bit_stays_close_to_full_precision(worlds):
    _, dirs = worlds
    lf, tf, _ = load(dirs[1], "fp", 1)
    l8, t8, _ = load(dirs[1], "q8", 1)
    agree = sum(a == b for a, b in zip(tf, t8)) / len(tf)
    assert agree >= 0.5, f"8-bit KV agrees with full precision on {agree:.0%} of greedy tokens"
    assert float(np.max(np.abs(lf - l8))) < 0.5
