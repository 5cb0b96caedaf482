"""Late KV quantization (--kv-quant-start) in the batched cache, at the model level: a batch
whose rows cross the start at different steps (some full precision, some quantized, in one
forward) gives each row the logits it gets alone with the single-stream
LateQuantizedKVCache, also after filter, extend (a newcomer) and extract."""

from __future__ import annotations

import mlx.core as mx
import pytest

from checkpoints import checkpoint
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.engine.dist import Comm
from mlx_kvshard.engine.kvcache import LateQuantizedKVCache, batch_cache_class, make_cache
from mlx_kvshard.engine.kvlate import FP, QUANT, BatchLateQuantizedKVCache
from mlx_kvshard.engine.loader import load_rank_model
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.settings import KVSettings

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 64], [128, 33, 2, 9, 300]]  # 7, 2, 5 tokens: start 8 crossed at steps 1, 6, 3
NEWCOMER = [44, 45, 46, 47, 48, 49, 50, 51, 52]  # joins already at the start: quantized at its next update
KV = KVSettings(bits=4, group_size=32, quant_start=8)  # 4-bit: a row in the wrong form shows in its logits


@pytest.fixture(scope="module")
def model(ckpt_root):
    d = checkpoint(ckpt_root, "kvq")
    plan = ShardPlan.build(ModelConfig.from_file(d), 1, compute_dtype="float32", kv=KV)
    return load_rank_model(d, plan, Comm(None), mx.float32), plan


def alone(model, prompt: list[int], feed: list[int]) -> list[mx.array]:
    """Logits after the prompt, then after each token of `feed` (one at a time)."""
    cache = model.make_cache()
    out = [model(mx.array(prompt)[None], cache, last_only=True)[0, -1]]
    for t in feed:
        out.append(model(mx.array([[t]]), cache, last_only=True)[0, -1])
    return out


def close(a, b) -> bool:
    return mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def test_rows_cross_the_start_at_different_steps(model):
    model, plan = model
    assert batch_cache_class(plan.shards[0], plan.kv) is BatchLateQuantizedKVCache
    feed = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    want = {i: alone(model, p, feed) for i, p in enumerate(PROMPTS)}
    want[3] = alone(model, NEWCOMER, feed)
    singles = {}
    for i, p in enumerate(PROMPTS + [NEWCOMER]):
        singles[i] = model.make_cache()
        assert isinstance(singles[i][0], LateQuantizedKVCache)
        first = model(mx.array(p)[None], singles[i], last_only=True)[0, -1]
        assert close(first, want[i][0])
    cache = [BatchLateQuantizedKVCache.merge([singles[0][k]]) for k in range(len(model.layers))]
    for i in (1, 2):
        for c, s in zip(cache, singles[i]):
            c.extend(BatchLateQuantizedKVCache.merge([s]))
    rows, fed = [0, 1, 2], {0: 0, 1: 0, 2: 0}

    def step():
        logits = model(mx.array([feed[fed[i]] for i in rows])[:, None], cache, last_only=True)[:, -1]
        for r, i in enumerate(rows):
            fed[i] += 1
            assert close(logits[r], want[i][fed[i]]), (i, fed[i], cache[0].form)

    step()  # row 0 (7 tokens) stays fp for this update, holds 8 after it
    assert cache[0].form == [FP, FP, FP]
    step()  # row 0 quantized before its update; rows 1, 2 still fp
    assert cache[0].form == [QUANT, FP, FP]
    step()
    step()  # row 2 (5 + 3 = 8) quantized now: the quantized rows 0, 2 sit around fp row 1
    assert cache[0].form == [QUANT, FP, QUANT]
    for c in cache:  # row 0 finishes
        c.filter(mx.array([1, 2]))
    rows = [1, 2]
    step()
    for c, s in zip(cache, singles[3]):  # a newcomer already holding 9 tokens, still fp
        c.extend(BatchLateQuantizedKVCache.merge([s]))
    rows, fed[3] = [1, 2, 3], 0
    assert cache[0].form == [FP, QUANT, FP]
    step()  # the newcomer quantized before this update; row 1 holds 2 + 5, then 8
    assert cache[0].form == [FP, QUANT, QUANT]
    step()
    assert cache[0].form == [QUANT, QUANT, QUANT] and cache[0].parts[FP] is None
    # extract row 2 (the newcomer) as a single-stream cache: it goes on as alone
    single = [LateQuantizedKVCache(KV.quant_start, KV.group_size, KV.bits) for _ in model.layers]
    for s, c in zip(single, cache):
        s.cache = c.extract(2)
    t = feed[fed[3]]
    assert close(model(mx.array([[t]]), single, last_only=True)[0, -1], want[3][fed[3] + 1])


def test_always_quantized_differs(model):
    """The check above can tell the forms apart: 4-bit from the first token differs."""
    model, plan = model
    late = alone(model, PROMPTS[0], [3, 1])
    cache = make_cache(plan.shards[0], KVSettings(bits=4, group_size=32, fp_window=0), len(model.layers))
    first = model(mx.array(PROMPTS[0])[None], cache, last_only=True)[0, -1]
    assert close(first, late[0]) is False


def test_conversion_point_follows_one_prompt_generate():
    """generate prefills all but the last prompt token in chunks of --prefill-step, then the
    last alone: the engine converts a row where that first update at or after T begins."""
    from mlx_kvshard.engine.kvlate import generate_quantizes_at as at

    assert at(8, 16, 13, last=True) == 12  # 12 tokens in one chunk, the 13th alone after them
    assert at(8, 16, 9, last=True) == 8
    assert at(8, 16, 40, last=True) == 16  # chunk [16, 32) is the first to begin at or after 8
    assert at(30, 16, 20, last=True) == 30  # decoding: one update per token
    assert at(8, 16, 24, last=False) == 16
