"""The batched quantized KV cache (for the serving engine) at the model level: a left-padded
batch of sequences of different lengths through our ShardedModel gives each sequence the
tokens it gets alone with mlx-lm's single-stream QuantizedKVCache, also after filter,
extend (a merged newcomer) and extract."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import QuantizedKVCache

from checkpoints import checkpoint
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.engine.dist import Comm
from mlx_kvshard.engine.kvcache import BatchQuantizedKVCache, batch_cache_class, make_batch_cache
from mlx_kvshard.engine.loader import load_rank_model
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.settings import KVSettings

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 64], [128, 33, 2, 9, 300]]
NEWCOMER = [44, 45, 46, 47]
BITS, GROUP = 8, 32


@pytest.fixture(scope="module")
def model(ckpt_root):
    d = checkpoint(ckpt_root, "kvq")
    plan = ShardPlan.build(ModelConfig.from_file(d), 1, compute_dtype="float32",
                           kv=KVSettings(bits=BITS, group_size=GROUP))
    return load_rank_model(d, plan, Comm(None), mx.float32), plan


def alone(model, prompt: list[int], n: int) -> list[int]:
    cache = [QuantizedKVCache(group_size=GROUP, bits=BITS) for _ in model.layers]
    y = mx.argmax(model(mx.array(prompt)[None], cache, last_only=True)[:, -1], axis=-1)
    out = [int(y.item())]
    for _ in range(n - 1):
        y = mx.argmax(model(y[None], cache, last_only=True)[:, -1], axis=-1)
        out.append(int(y.item()))
    return out


def step(model, cache, last: list[int]) -> list[int]:
    logits = model(mx.array(last)[:, None], cache, last_only=True)[:, -1]
    return mx.argmax(logits, axis=-1).tolist()


def test_batch_matches_each_sequence_alone(model):
    model, plan = model
    want = {i: alone(model, p, 12) for i, p in enumerate(PROMPTS)}
    want_new = alone(model, NEWCOMER, 6)
    width = max(map(len, PROMPTS))
    pads = [width - len(p) for p in PROMPTS]
    cache = make_batch_cache(plan.shards[0], plan.kv, len(model.layers), pads)
    assert all(isinstance(c, BatchQuantizedKVCache) for c in cache)
    ids = mx.array([[0] * p + q for p, q in zip(pads, PROMPTS)])
    got = {i: [t] for i, t in enumerate(mx.argmax(model(ids, cache, last_only=True)[:, -1], axis=-1).tolist())}
    rows = [0, 1, 2]
    for _ in range(5):
        for i, t in zip(rows, step(model, cache, [got[i][-1] for i in rows])):
            got[i].append(t)
    assert [got[i] for i in rows] == [want[i][:6] for i in rows]

    # sequence 1 finishes: filter it out and go on
    for c in cache:
        c.filter(mx.array([0, 2]))
    rows = [0, 2]
    for _ in range(2):
        for i, t in zip(rows, step(model, cache, [got[i][-1] for i in rows])):
            got[i].append(t)

    # a newcomer prefilled alone joins: merge its single-stream cache, then extend the batch
    single = [QuantizedKVCache(group_size=GROUP, bits=BITS) for _ in model.layers]
    got[3] = [int(mx.argmax(model(mx.array(NEWCOMER)[None], single, last_only=True)[:, -1], axis=-1).item())]
    for c, s in zip(cache, single):
        c.extend(BatchQuantizedKVCache.merge([s]))
    rows = [0, 2, 3]
    for _ in range(4):
        for i, t in zip(rows, step(model, cache, [got[i][-1] for i in rows])):
            got[i].append(t)
    assert got[0] == want[0] and got[2] == want[2] and got[3] == want_new[:5]

    # extract sequence 0 as a single-stream cache: it continues exactly as alone
    single0 = [c.extract(0) for c in cache]
    more = alone(model, PROMPTS[0], 14)
    y = mx.argmax(model(mx.array([[got[0][-1]]]), single0, last_only=True)[:, -1], axis=-1)
    assert int(y.item()) == more[12]
    assert sum(c.nbytes for c in cache) > 0


def test_a_sequence_sharded_head_gets_the_unpadded_batch_cache(model):
    """Left padding cannot hold a shared head's positions (ownership follows each row's own
    token index): its batch is seqkv's, whose rows never join a padded batch."""
    from mlx_kvshard.engine.seqkv import BatchSequenceKVCache

    _, plan = model
    seq = ShardPlan.build(plan.config, 8, kv=KVSettings(shard="sequence")).shards[0]
    assert seq.seq_sharers > 1
    assert batch_cache_class(seq, KVSettings(shard="sequence")) is BatchSequenceKVCache
    with pytest.raises(AssertionError):
        make_batch_cache(seq, KVSettings(shard="sequence"), 2, [0])
