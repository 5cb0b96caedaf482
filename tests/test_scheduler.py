"""Rank 0's scheduler, prefix index and step message, in pure Python (no ranks)."""

from __future__ import annotations

from mlx_kvshard.serving import wire
from mlx_kvshard.kv.index import BlockIndex, Insert
from mlx_kvshard.serving.scheduler import Scheduler, Seq
from mlx_kvshard.settings import EngineSettings


def test_step_message_round_trip_and_capacity():
    step = wire.Step(index=7, save=[(11, 0, 40, 3, -1, 1)], remove=[11, 12], join=[13], decode=[(13, 5), (14, 9)],
                     prefill=[wire.Prefill(15, 16, [1, 2, 3], True, 2, 16)], put=[(15, 16, 19, 4, 2, 0)], drop=[2, 5],
                     audit=True)
    size = wire.capacity(max_batch=16, prefill_step=512)
    assert wire.decode(wire.encode(step, size)) == step
    disk = wire.Step(index=9, unlink=[4, 6], disk_off=True, load=(3, list(range(10, 10 + wire.MAX_LOADS))))
    assert wire.decode(wire.encode(disk, wire.capacity(16, 512, disk=True))) == disk
    assert wire.decode(wire.encode(wire.Step(index=8, idle=True), size)).idle


def test_block_index_shares_blocks_hits_exactly_and_evicts_lru_leaves():
    idx = BlockIndex(max_bytes=300, bytes_per_token=1, block_tokens=8, min_tokens=4)
    system = list(range(100, 124))  # 3 whole blocks
    new, evict = idx.insert(system + [1, 2, 3])
    assert new == Insert(0, 27, 0, -1) and evict == [] and len(idx) == 4 and idx.tokens == 27  # 3 blocks + a short tail
    # a second chat on the same system prompt stores only its own blocks
    new, evict = idx.insert(system + [7] * 10)
    assert new == Insert(24, 34, 4, 2) and evict == [] and idx.tokens == 37
    # hits: the longest chain, plus the first positions of one block (exact), one prompt token left over
    assert idx.lookup(system + [7] * 5 + [9]).tokens == 29
    hit = idx.lookup(system + [1, 2, 3])
    assert (hit.block, hit.tokens) == (3, 26)  # the short tail block, all but the last prompt token
    assert idx.lookup(system[:20] + [5] * 8).tokens == 20  # inside the third block
    assert idx.lookup([5] * 30) is None and idx.lookup(system[:3] + [5]) is None  # below min_tokens
    # an insertion covering the short tail replaces it
    new, evict = idx.insert(system + [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert evict == [3] and new == Insert(24, 33, 6, 2)
    assert idx.insert(system + [1, 2, 3]) == (None, [])  # inside a cached block: nothing new
    # LRU over leaves: the system prompt's chain is in use; the oldest leaf goes first
    idx.lookup(system + [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])  # touches the [1..8] chain
    new, evict = idx.insert(list(range(500, 500 + 270)))
    assert evict[:2] == [5, 4] and idx.tokens <= 300  # the [7]*10 chat went first, leaf by leaf
    assert idx.insert(list(range(301))) == (None, [])  # larger than the whole cache: not kept


def seq(uid, prompt_len, budget):
    return Seq(uid, list(range(prompt_len)), budget)


def test_scheduler_admission_budget_and_row_order():
    sched = Scheduler(EngineSettings(max_batch=2, prefill_step=8, prefix_cache_bytes=0), kv_capacity=100, prefix=None)
    a, b, c = seq(1, 12, 4), seq(2, 3, 4), seq(3, 3, 4)
    sched.waiting.extend([a, b, c])
    s0 = sched.next_step()
    assert [(p.uid, p.start, len(p.tokens), p.last) for p in s0.prefill] == [(1, 0, 8, False)]  # budget 8, FIFO
    assert [x.uid for x in sched.prefilling] == [1, 2]  # max_batch 2: the third waits
    s1 = sched.next_step()
    assert [(p.uid, p.start, len(p.tokens), p.last) for p in s1.prefill] == [(1, 8, 4, True), (2, 0, 3, True)]
    for x in (a, b):
        x.generated.append(100 + x.uid)
        sched.prefilled(x)
    s2 = sched.next_step()
    assert s2.join == [1, 2] and s2.decode == [(1, 101), (2, 102)]
    sched.finish(a)
    s3 = sched.next_step()
    assert s3.remove == [1] and s3.decode == [(2, 102)]
    assert [x.uid for x in sched.prefilling] == [3]  # admitted once a slot freed
    assert sched.never_fits(90, 20) and "at most 100" in sched.never_fits(90, 20)


def test_prefill_budget_follows_measured_costs():
    sched = Scheduler(EngineSettings(prefill_step=512, prefill_decode_ratio=2.0), kv_capacity=10**6, prefix=None)
    assert sched.prefill_budget() == 512  # nothing decodes: the whole budget
    sched.running.append(seq(1, 4, 4))
    assert sched.prefill_budget() == 16  # decoding, costs unknown: a small chunk
    sched.measured(decode_s=0.1, prefill_s=0.5, prefill_tokens=100)  # 5 ms per prompt token
    assert sched.prefill_budget() == 40  # 2 decode forwards' worth
    sched.measured(decode_s=10.0, prefill_s=0.005, prefill_tokens=1)
    assert sched.prefill_budget() == 512  # never past --prefill-step


def test_thousands_of_evictions_spread_over_bounded_step_messages():
    """One long insertion evicts thousands of short entries: each step message carries at
    most MAX_DROPS of them and fits its buffer; the rest follow in the next steps."""
    settings = EngineSettings(max_batch=4, prefill_step=64)
    prefix = BlockIndex(max_bytes=1200 * 16, bytes_per_token=1, block_tokens=64, min_tokens=16)
    sched = Scheduler(settings, kv_capacity=10**6, prefix=prefix)
    for i in range(1200):
        prefix.insert([i // 256, i % 256, *range(14)])
    assert len(prefix) == 1200
    long = Seq(1, list(range(1000, 1000 + 1200 * 16)), 1)
    sched.waiting.append(long)
    size, sent = wire.engine_capacity(settings), []
    while sched.busy():
        step = sched.next_step()
        sent += wire.decode(wire.encode(step, size)).drop
        if step.prefill and step.prefill[-1].last:
            long.generated.append(5)
            sched.prefilled(long)
            sched.finish(long)
    assert len(sent) == len(set(sent)) == 1200 == prefix.evictions and len(prefix) == 1200 * 16 // 64


def test_block_index_heap_stays_bounded_under_many_hits():
    idx = BlockIndex(max_bytes=10**6, bytes_per_token=1, block_tokens=16, min_tokens=4)
    prompts = [[i, *range(40)] for i in range(20)]
    for p in prompts:
        idx.insert(p)
    for _ in range(500):
        for p in prompts:
            assert idx.lookup(p + [7]).tokens == len(p)
    assert len(idx._leaves) <= 4 * len(idx) + 64


def test_block_index_random_workload_keeps_its_invariants():
    """Random prompts over a small alphabet (so they share prefixes): every hit's chain
    spells the prompt's first tokens, the cache stays within its bytes, and a mirror of
    what the ranks hold (ids and parents, from the inserts and evictions) always has every
    block's parent."""
    import random

    rng = random.Random(5)
    idx = BlockIndex(max_bytes=400, bytes_per_token=1, block_tokens=8, min_tokens=4)
    held: dict[int, int] = {}  # the ranks' blocks: id -> parent
    bases = [[rng.randrange(3) for _ in range(rng.randrange(10, 60))] for _ in range(6)]
    for _ in range(2000):
        prompt = rng.choice(bases)[:rng.randrange(5, 60)] + [rng.randrange(3) for _ in range(rng.randrange(0, 20))]
        hit = idx.lookup(prompt)
        if hit is not None:
            chain, b = [], idx.blocks[hit.block]
            while b is not idx.root:
                chain[:0] = b.tokens
                b = b.parent
            assert chain[:hit.tokens] == prompt[:hit.tokens] and hit.tokens < len(prompt)
        new, evict = idx.insert(prompt)
        for i in evict:
            assert i in held
            del held[i]
        if new is not None:
            for k, _ in enumerate(range(new.start, new.end, 8)):
                held[new.first + k] = new.parent if k == 0 else new.first + k - 1
        assert set(held) == set(idx.blocks) and all(p == -1 or p in held for p in held.values())
        assert idx.bytes <= 400 and idx.tokens == sum(len(b.tokens) for b in idx.blocks.values())


def test_a_long_request_never_keeps_short_ones_waiting_when_their_kv_fits():
    """kv/layout.py's length groups: admission counts each row's own prompt + max_tokens
    (plus its group's bounded padding), so short requests join beside a long one; the
    padded layout reserves rows x the longest and makes them wait. Either way a request
    that fits alone is never refused."""
    from mlx_kvshard.kv.admission import admission_tokens

    long, shorts = seq(1, 1000, 24), [seq(2 + i, 40, 24) for i in range(6)]
    capacity = 1800
    assert admission_tokens("groups", [1024] + [64] * 6) == 1126 + 6 * 96  # each + max(10%, 32 tokens) of padding
    assert admission_tokens("groups", [1024]) == 1024 and admission_tokens("padded", [1024, 64]) == 2048
    admitted = {}
    for layout in ("groups", "padded"):
        sched = Scheduler(EngineSettings(max_batch=8, prefill_step=2048, prefix_cache_bytes=0, kv_layout=layout),
                          kv_capacity=capacity, prefix=None)
        assert sched.never_fits(1000, 24) is None and sched.never_fits(1000, capacity) is not None
        sched.waiting.extend([seq(1, 1000, 24), *(seq(2 + i, 40, 24) for i in range(6))])
        sched.next_step()
        admitted[layout] = [s.uid for s in sched.prefilling]
    assert admitted["groups"] == [1, *(s.uid for s in shorts)]  # all seven run together
    assert admitted["padded"] == [long.uid]  # 2 x 1024 > capacity: the short ones wait for the long one
