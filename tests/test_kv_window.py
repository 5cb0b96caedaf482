"""The full-precision window cache (--kv-fp-window, engine/kvwindow.py) at the model level:
every query sees its own last W positions in full precision whatever the prefill chunks; a
left-padded batch (merge, extend, filter, extract) gives each row the logits it gets alone;
a window covering everything is full precision; prefix-cache blocks join with the window's
boundary."""

from __future__ import annotations

import mlx.core as mx
import pytest

from checkpoints import checkpoint
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.engine.dist import Comm
from mlx_kvshard.engine.kvcache import batch_cache_class, joined_copy, slice_copy
from mlx_kvshard.engine.kvwindow import WindowQuantizedKVCache as Window
from mlx_kvshard.engine.loader import load_rank_model
from mlx_kvshard.errors import UserError
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.settings import KVSettings

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 64], [128, 33, 2, 9, 300]]
FEED = [3, 1, 4, 1, 5, 9, 2, 6]
KV = KVSettings(bits=4, group_size=32, fp_window=4)


def build(ckpt_root, kv):
    d = checkpoint(ckpt_root, "kvq")
    plan = ShardPlan.build(ModelConfig.from_file(d), 1, compute_dtype="float32", kv=kv)
    return load_rank_model(d, plan, Comm(None), mx.float32), plan


@pytest.fixture(scope="module")
def model(ckpt_root):
    return build(ckpt_root, KV)


def alone(model, prompt, chunk=100):
    cache = model.make_cache()
    for i in range(0, len(prompt), chunk):
        out = [model(mx.array(prompt[i:i + chunk])[None], cache, last_only=True)[0, -1]]
    for t in FEED:
        out.append(model(mx.array([[t]]), cache, last_only=True)[0, -1])
    return out, cache


def close(a, b, tol=1e-4) -> bool:
    return mx.allclose(a, b, atol=tol, rtol=tol).item()


def test_chunks_change_nothing_and_a_wide_window_is_full_precision(model, ckpt_root):
    model, plan = model
    assert isinstance(model.make_cache()[0], Window) and batch_cache_class(plan.shards[0], plan.kv) is Window
    whole, cache = alone(model, PROMPTS[0])
    assert cache[0].nq == len(PROMPTS[0]) + len(FEED) - 4 and cache[0].nf == 4
    chunked, _ = alone(model, PROMPTS[0], chunk=3)
    assert all(close(a, b) for a, b in zip(whole, chunked))
    fp, _ = build(ckpt_root, KVSettings())
    wide, _ = build(ckpt_root, KVSettings(bits=4, group_size=32, fp_window=64))
    want, _ = alone(fp, PROMPTS[0])
    got, _ = alone(wide, PROMPTS[0])
    assert all(close(a, b) for a, b in zip(want, got))
    assert not close(whole[-1], want[-1], tol=1e-2)  # the 4-position window does quantize


def test_batch_matches_each_row_alone(model):
    model, _ = model
    want = {i: alone(model, p)[0] for i, p in enumerate(PROMPTS)}
    singles = []
    for p in PROMPTS:
        c = model.make_cache()
        model(mx.array(p)[None], c, last_only=True)
        singles.append(c)
    cache = [Window.merge([s[k] for s in singles[:2]]) for k in range(len(model.layers))]
    rows, fed = [0, 1], {0: 0, 1: 0, 2: 0}

    def step():
        logits = model(mx.array([FEED[fed[i]] for i in rows])[:, None], cache, last_only=True)[:, -1]
        for r, i in enumerate(rows):
            fed[i] += 1
            assert close(logits[r], want[i][fed[i]]), (i, fed[i])

    step()
    step()
    for c, s in zip(cache, singles[2]):
        c.extend(Window.merge([s]))
    rows = [0, 1, 2]
    step()
    step()
    for c in cache:
        c.filter(mx.array([1, 2]))
    rows = [1, 2]
    step()
    row = [c.extract(1) for c in cache]  # the third prompt alone again
    logits = model(mx.array([[FEED[fed[2]]]]), row, last_only=True)[0, -1]
    assert close(logits, want[2][fed[2] + 1])


def test_prefix_blocks_join_with_the_window_boundary(model):
    model, _ = model
    _, cache = alone(model, PROMPTS[0])  # 15 positions: 11 quantized, 4 full precision
    blocks = [[slice_copy(c, s, min(s + 4, 12)) for c in cache] for s in range(0, 12, 4)]
    assert [b[0].nq for b in blocks] == [4, 4, 3]  # the last block's position 11 was in the window
    joined = [joined_copy([b[k] for b in blocks], 10) for k in range(len(model.layers))]
    assert joined[0]._idx == 10 and joined[0].nq == 6 and joined[0].nf == 4
    # positions 6-9 were stored quantized: the window holds their dequantized values
    k = mx.dequantize(*[x[..., 6:10, :] for x in cache[0].qk], group_size=32, bits=4)
    assert close(joined[0].fk, k, tol=1e-6)


def test_window_refused_where_it_cannot_work(ckpt_root):
    cfg = ModelConfig.from_file(checkpoint(ckpt_root, "seq_kv2"))
    with pytest.raises(UserError, match="--kv-fp-window 8 with sequence-sharded"):
        ShardPlan.build(cfg, 3, kv=KVSettings(bits=4, group_size=32, fp_window=8, shard="sequence"))
    seq = ShardPlan.build(cfg, 3, kv=KVSettings(bits=4, group_size=32, shard="sequence"))
    assert seq.kv.window == 0  # the default yields
    with pytest.raises(UserError, match="choose one"):
        KVSettings(bits=4, fp_window=8, quant_start=16).check()
    with pytest.raises(UserError, match="needs --kv-bits"):
        KVSettings(fp_window=8).check()
