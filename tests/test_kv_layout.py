"""The running rows' KV in length groups (kv/layout.py), at the cache level: rows join the
group within 10% of their length or start one, holes are refilled in place or compacted,
and every row's attention equals that row alone in mlx-lm's single-stream cache (full
precision and 8-bit), step after step, through joins, holes and removals."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache

from mlx_kvshard.engine.kvbase import BatchQuantizedKVCache
from mlx_kvshard.kv.layout import RunningKV

H, HQ, D = 2, 4, 64


def kv(n: int, seed: int):
    mx.random.seed(seed)
    return mx.random.normal((1, H, n, D)), mx.random.normal((1, H, n, D))


class Oracle:
    """Each row alone, in mlx-lm's own single-stream cache."""

    def __init__(self, bits):
        self.bits, self.rows = bits, {}

    def new(self, uid: int, n: int):
        c = QuantizedKVCache(group_size=64, bits=self.bits) if self.bits else KVCache()
        c.update_and_fetch(*kv(n, uid))
        mine = QuantizedKVCache(group_size=64, bits=self.bits) if self.bits else KVCache()
        mine.update_and_fetch(*kv(n, uid))  # the engine's copy (the oracle keeps its own)
        self.rows[uid] = c
        return [mine]

    def attend(self, uid, q, k, v):
        c = self.rows[uid]
        k, v = c.update_and_fetch(k, v)
        return scaled_dot_product_attention(q, k, v, cache=c, scale=D ** -0.5, mask=None)


def step(run: RunningKV, oracle: Oracle, seed: int) -> None:
    """One decode token for every slot; live rows must equal their oracle."""
    B = len(run.rows)
    mx.random.seed(1000 + seed)
    q, k, v = mx.random.normal((B, HQ, 1, D)), mx.random.normal((B, H, 1, D)), mx.random.normal((B, H, 1, D))
    run.cache[0].make_mask(1)  # a new forward, as the model starts one
    out = run.cache[0].attend(mx.array(q), k, v, D ** -0.5)  # mlx-lm's quantized attention scales q in place
    for j, uid in enumerate(run.rows):
        if uid is not None:
            want = oracle.attend(uid, q[j:j + 1], k[j:j + 1], v[j:j + 1])
            assert mx.allclose(out[j:j + 1], want, atol=1e-4).item(), (seed, uid)
    assert run.row_tokens() == [oracle.rows[u].offset for u in run.live]


@pytest.mark.parametrize("bits", [None, 8])
def test_length_groups_equal_each_row_alone_through_joins_holes_and_removals(bits):
    kind = BatchQuantizedKVCache if bits else BatchKVCache
    run = RunningKV(kind, "groups", slots=bits is None, kv_capacity=None)
    oracle = Oracle(bits)
    uid_len = {1: 100, 2: 30, 3: 95, 4: 32, 5: 2000}
    for uid, n in uid_len.items():
        run.join(uid, oracle.new(uid, n))
    groups = run.cache[0].group
    # 100 and 95 share a group (95 padded by 5), 30 and 32 another (30 by 2), 2000 alone (a row
    # may be padded by 10% of its tokens or 32 tokens, the more: 100 would pad 30 by 70)
    assert groups == [0, 0, 1, 1, 2] and run.rows == [1, 3, 2, 4, 5] and run.groups() == 3
    held = run.allocated_tokens()
    assert held <= sum(n + max(n // 10, 32) for n in uid_len.values()), held  # not 5 rows x 2000
    for s in range(3):
        step(run, oracle, s)
    run.remove([3])
    if bits is None:  # a hole worth < 10% of the live tokens stays; a 99-token prompt fits its group
        assert run.rows == [1, None, 2, 4, 5]
        run.join(6, oracle.new(6, 99))
        assert run.rows == [1, 6, 2, 4, 5] and run.groups() == 3
    else:  # no slots with quantized rows: compacted at once, and the prompt joins its group by extend
        assert run.rows == [1, 2, 4, 5]
        run.join(6, oracle.new(6, 99))
        assert run.rows == [1, 6, 2, 4, 5] and run.cache[0].group == [0, 0, 1, 1, 2]
    for s in range(3, 6):
        step(run, oracle, s)
    run.join(7, oracle.new(7, 500))  # no group within its allowance (50 tokens): a group of its own
    assert run.groups() == 4
    step(run, oracle, 6)
    run.remove([2, 4])  # a group left with holes only is compacted away
    assert None not in run.rows and run.groups() == 3
    step(run, oracle, 7)
    for uid in run.live:  # a row extracted (a prefix-cache block's source) is the row alone
        got, want = run.extract(uid)[0], oracle.rows[uid]
        assert got.offset == want.offset
        a = got.keys if bits is None else got.keys[0]
        b = want.keys[..., :want.offset, :] if bits is None else want.keys[0][..., :want.offset, :]
        assert mx.array_equal(a, b).item()
    run.remove(list(run.live))
    assert run.rows == [] and run.cache is None and run.nbytes() == 0


@pytest.mark.parametrize("bits", [None, 8])
def test_random_joins_and_removals_keep_every_row_equal_to_itself_alone(bits):
    """A generator of joins (1 to 400 tokens), removals and decode steps: after every step
    each live row's attention equals the row alone, and the batch holds no more than each
    row's tokens plus its padding allowance, the holes' columns and the growth room."""
    import random

    from mlx_kvshard.kv.admission import pad_allowance

    rng = random.Random(7 if bits is None else 8)
    kind = BatchQuantizedKVCache if bits else BatchKVCache
    run = RunningKV(kind, "groups", slots=bits is None, kv_capacity=None)
    oracle, uid = Oracle(bits), 0
    for s in range(60):
        live = run.live
        if not live or (len(live) < 8 and rng.random() < 0.5):
            uid += 1
            run.join(uid, oracle.new(uid, rng.choice([rng.randint(1, 40), rng.randint(41, 400)])))
        elif rng.random() < 0.3:
            run.remove(rng.sample(live, rng.randint(1, min(2, len(live)))))
        if run.cache is None:
            continue
        step(run, oracle, 100 + s)
        c = run.cache[0]
        for g in range(len(c.parts)):  # every live row within its allowance of its group's columns
            for j in c.members(g):
                if run.rows[j] is not None:
                    assert c.columns(g) - c.lengths[j] <= pad_allowance(c.lengths[j]), (s, g, j)
        assert sorted(c.group) == c.group  # groups contiguous, in order
