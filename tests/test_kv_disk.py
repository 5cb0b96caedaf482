"""The prefix cache's disk tier (--prefix-cache-dir).

In pure Python: rank 0's index keeps blocks evicted from RAM as disk blocks, within both
budgets, with both tiers closed under parents; a hit on disk blocks loads them back, a
failed load drops them; the manifest rebuilds the tree.

Through real HTTP at world 2 (one directory across phases): a server started again with
the same directory reuses its blocks (cached_tokens >= 90% of the prompt, the cold
server's greedy text); a corrupted byte in one rank's block file is caught and recomputed
(the cold text); the directory at another world size is ignored with one notice; an
unwritable directory is one warning and serving goes on. In process: blocks pushed out of RAM come
back from disk (the mlx-lm oracle's tokens); a disk that fails under a running server turns
the tier off with one warning."""

from __future__ import annotations

import random

from mlx_kvshard.kv.index import BlockIndex


def chain_of(idx: BlockIndex, block: int) -> list:
    out, b = [], idx.blocks[block]
    while b is not idx.root:
        out.append(b)
        b = b.parent
    return out[::-1]


def check_invariants(idx: BlockIndex) -> None:
    for b in idx.blocks.values():
        assert b.ram or b.disk
        if b.parent is not idx.root:
            assert not b.ram or b.parent.ram, "RAM blocks hang under RAM blocks"
            assert not b.disk or b.parent.disk, "disk blocks hang under disk blocks"
        assert b.ram_kids == sum(c.ram for c in b.children.values())
        assert b.disk_kids == sum(c.disk for c in b.children.values())
    assert idx.tokens == sum(len(b.tokens) for b in idx.blocks.values() if b.ram)
    assert idx.disk_tokens == sum(len(b.tokens) for b in idx.blocks.values() if b.disk)
    assert idx.tier_blocks() == {"ram": sum(b.ram for b in idx.blocks.values()),
                                 "disk": sum(b.disk for b in idx.blocks.values())}
    assert idx.bytes <= idx.max_bytes and idx.disk_used <= max(idx.disk_bytes, 0)


def test_index_tiers_load_back_fail_and_restore():
    idx = BlockIndex(max_bytes=48, bytes_per_token=1, block_tokens=8, min_tokens=4, disk_bytes=200)
    a, b = list(range(100, 140)), list(range(200, 240))  # 5 blocks each
    new, evict = idx.insert(a)
    assert new.persist and evict == [] and idx.tier_blocks() == {"ram": 5, "disk": 5}
    new, evict = idx.insert(b)  # RAM holds 48 tokens: a's blocks leave RAM, leaf first, and stay on disk
    assert new.persist and sorted(evict) == [1, 2, 3, 4] and idx.tier_blocks() == {"ram": 6, "disk": 10}
    hit = idx.lookup(a + [1])
    assert hit.tokens == 40 and hit.load == [1, 2, 3, 4]
    assert idx.in_ram(hit).tokens == 8
    parent, ids, freed = idx.plan_load(hit, most=3)
    assert (parent, ids) == (0, [1, 2, 3]) and freed and all(i >= 5 for i in freed)
    assert idx.loaded(ids, 2) == []  # every rank read blocks 1 and 2; block 3 failed: it and block 4 are gone
    assert 3 not in idx.blocks and 4 not in idx.blocks and idx.unlinks[-2:] == [4, 3] and idx.load_failures == 1
    assert idx.lookup(a + [1]) == idx.lookup(a[:24] + [1]) and idx.lookup(a + [1]).load == []
    check_invariants(idx)
    again = BlockIndex(max_bytes=64, bytes_per_token=1, block_tokens=8, min_tokens=4, disk_bytes=200)
    again.restore(idx.manifest() + [["x"], [99, 0], None], idx._next_id)  # damaged entries are skipped
    assert again.tier_blocks() == {"ram": 0, "disk": len(idx.manifest())} and again._next_id == idx._next_id
    assert again.lookup(b + [1]).load == [5, 6, 7, 8, 9]
    check_invariants(again)
    again.disk_off()
    assert len(again) == 0 and again.disk_bytes == 0


def test_index_random_workload_keeps_both_tiers_consistent():
    rng = random.Random(7)
    idx = BlockIndex(max_bytes=120, bytes_per_token=1, block_tokens=8, min_tokens=4, disk_bytes=400)
    held: dict[int, int] = {}  # a rank's RAM blocks: id -> parent, from the inserts, loads and frees
    bases = [[rng.randrange(3) for _ in range(rng.randrange(10, 70))] for _ in range(8)]
    for _ in range(1500):
        prompt = rng.choice(bases)[:rng.randrange(5, 70)] + [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        hit = idx.lookup(prompt, count=False)
        if hit is not None and hit.load:
            parent, ids, freed = idx.plan_load(hit, most=4)
            for i in freed:
                del held[i]
            for k, i in enumerate(ids):
                held[i] = ids[k - 1] if k else parent
            ok = rng.randrange(len(ids) + 1) if ids and rng.random() < 0.2 else len(ids)
            for i in ids[ok:]:
                del held[i]
            assert idx.loaded(ids, ok) == []
        new, evict = idx.insert(prompt)
        for i in evict:
            del held[i]
        if new is not None:
            for k, _ in enumerate(range(new.start, new.end, 8)):
                held[new.first + k] = new.parent if k == 0 else new.first + k - 1
        check_invariants(idx)
        assert set(held) == {b.id for b in idx.blocks.values() if b.ram}
        assert all(p == -1 or p in held for p in held.values())  # a rank can always walk a RAM chain


# ---- real servers -----------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from checkpoints import checkpoint  # noqa: E402
from liveness_procs import tagged  # noqa: E402
from server_procs import Server  # noqa: E402
from test_kv_churn import complete  # noqa: E402

BLOCK = 32
P = [(7 * i + 3) % 200 + 2 for i in range(10 * BLOCK + 5)]  # 10 whole blocks and a part of one
Q = [(5 * i + 1) % 190 + 3 for i in range(4 * BLOCK + 9)]
N_TOKENS = 5
NOTICE, WARNING = "notice: --prefix-cache-dir", "warning: --prefix-cache-dir"


def metric(server: Server, line_start: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(x for x in text.splitlines() if x.startswith(line_start)).split()[-1])


def serve(model, tmp, tag: str, world: int, cache_dir, *extra: str):
    """A server on `cache_dir`: P then Q, one after the other; (texts, usages, server, its stderr)."""
    launch = ["--simulate", str(world)] if world > 1 else []  # world 1: the rank itself, no launcher
    server = Server(tmp, ["serve", *launch, "--model", str(model), "--served-model-name", "m",
                          "--port", "0", "--max-context", "512", "--peer-timeout", "5", "--max-batch", "2",
                          "--prefix-block-tokens", str(BLOCK), "--prefix-cache-dir", str(cache_dir), *extra],
                    f"{tag}-{os.getpid()}")
    try:
        server.wait_ready()
        got = [complete(server, prompt, N_TOKENS) for prompt in (P, Q)]
        assert httpx.get(server.url + "/health").status_code == 200
        counters = {k: metric(server, f"mlx_kvshard_{k}") for k in (
            'prefix_cache_tier_hits_total{tier="disk"}', "prefix_cache_disk_load_failures_total",
            "prefix_cache_disk_enabled", 'prefix_cache_tier_blocks{tier="disk"}')}
    finally:
        server.stop()
        assert not tagged(server.tag)
    return [r["choices"][0]["text"] for r in got], [r["usage"] for r in got], counters, server.stderr()


def cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads rank processes in /proc")
def test_disk_tier_survives_restarts_and_refuses_what_it_cannot_trust(ckpt_root, tmp_path):
    model = checkpoint(ckpt_root, "llama_kv8")
    cache_dir = tmp_path / "kv"
    cold, usage, counters, err = serve(model, tmp_path, "disk-cold", 2, cache_dir)
    assert [cached(u) for u in usage] == [0, 0] and counters['prefix_cache_tier_blocks{tier="disk"}'] >= 16
    assert NOTICE not in err and WARNING not in err

    # one flipped byte in one of Q's blocks on rank 1 (its second block: the first still hits)
    manifest = json.loads((cache_dir / "rank0" / "manifest.json").read_text())["blocks"]
    first = next(i for i, parent, tokens in manifest if parent == -1 and tokens == Q[:BLOCK])
    second = next(i for i, parent, tokens in manifest if parent == first)
    path = cache_dir / "rank1" / "blocks" / f"{second}.kv"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))

    warm, usage, counters, err = serve(model, tmp_path, "disk-warm", 2, cache_dir)
    assert warm == cold  # the greedy text of a cold server, after a restart, one block corrupt
    assert cached(usage[0]) >= 0.9 * len(P), usage  # read back from disk after the restart
    assert cached(usage[1]) == BLOCK, usage  # up to the corrupt block; every rank recomputed from it
    assert counters['prefix_cache_tier_hits_total{tier="disk"}'] == 2
    assert counters["prefix_cache_disk_load_failures_total"] >= 1

    # the directory at another world size: ignored with one notice, right text
    other, usage, counters, err = serve(model, tmp_path, "disk-world1", 1, cache_dir)
    assert other == cold and [cached(u) for u in usage] == [0, 0]
    assert err.count(NOTICE) == 1 and "world 2 here, 1 now" in err, err[-2000:]

    # a directory nothing can be written to: one warning, the tier is off, serving goes on
    if os.geteuid() == 0:  # root writes through permissions: a regular file stands where the directory would be
        blocked = tmp_path / "not-a-dir"
        blocked.write_text("")
    else:
        blocked = tmp_path / "read-only"
        blocked.mkdir()
        blocked.chmod(0o500)
    off, usage, counters, err = serve(model, tmp_path, "disk-off", 1, blocked)
    assert off == cold and counters["prefix_cache_disk_enabled"] == 0
    assert err.count(WARNING) == 1 and "the disk tier is off" in err, err[-2000:]


def test_evicted_blocks_come_back_from_disk_and_a_failing_disk_turns_the_tier_off(ckpt_root, tmp_path, capfd):
    """In process at world 1 (the real engine and ranks' code): blocks pushed out of a small
    RAM cache are read back from disk on the next hit (the same greedy tokens); then the
    directory goes away under the running server: one warning, the tier turns off (rank 0's
    own disk: DISKOFF in its next step), serving goes on from RAM."""
    import shutil
    import time

    from mlx_kvshard.serving.requests import Request
    from test_engine_api import greedy, with_engine

    model = checkpoint(ckpt_root, "llama_kv8")
    p, q, r = P[:100], Q[:100], [(3 * i + 2) % 180 + 5 for i in range(60)]

    def body(engine):
        prefix = engine.scheduler.prefix
        first = engine.generate(Request(prompt_ids=p, params=greedy(4)))
        engine.generate(Request(prompt_ids=q, params=greedy(4)))  # pushes p's blocks out of RAM
        assert prefix.tier_blocks()["ram"] < prefix.tier_blocks()["disk"]
        again = engine.generate(Request(prompt_ids=p, params=greedy(4)))
        disk_hits = prefix.tier_hits["disk"]
        shutil.rmtree(tmp_path / "kv" / "rank0" / "blocks")
        engine.generate(Request(prompt_ids=r, params=greedy(2)))  # its blocks cannot be written
        deadline = time.monotonic() + 60
        while engine.state.disk.broken is None and time.monotonic() < deadline:
            time.sleep(0.05)
        last = engine.generate(Request(prompt_ids=p, params=greedy(4)))
        return first, again, disk_hits, last, prefix.disk_bytes, engine.metrics.snapshot()["prefix_cache"]

    first, again, disk_hits, last, disk_bytes, gauges = with_engine(
        model, body, prefix_block_tokens=16, prefix_cache_bytes=1024 * 150, prefix_cache_dir=str(tmp_path / "kv"))
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_kvshard.models.architectures import load_oracle

    lm = load_oracle(model, mx.float32)
    want = [int(t) for t, _ in generate_step(mx.array(p), lm, max_tokens=4, sampler=lambda lp: mx.argmax(lp, -1))]
    assert first.tokens == want[:len(first.tokens)] and first.tokens  # (an EOS ends it early)
    assert again.tokens == first.tokens and again.usage.cached_tokens >= 90 and disk_hits == 1
    assert last.tokens == first.tokens and disk_bytes == 0 and not gauges["disk_on"]
    assert capfd.readouterr().err.count("warning: the prefix cache's disk tier stops") == 1


def test_block_files_round_trip_exactly_and_refuse_what_they_cannot_vouch_for(tmp_path):
    """A block written by one tier reads back bit-exact in another (full precision in
    bfloat16, and --kv-bits 8's packed triples); another epoch, another parent, a cut file
    or a flipped byte reads as nothing."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    from mlx_kvshard.kv.disk import DiskTier
    from mlx_kvshard.settings import KVSettings

    def layer(kv, seed):
        k, v = (mx.random.normal((1, 2, 5, 64), key=mx.random.key(seed + i)).astype(mx.bfloat16) for i in (0, 1))
        if kv.bits is None:
            c = KVCache()
            c.keys, c.values = k, v
        else:
            c = QuantizedKVCache(group_size=kv.group_size, bits=kv.bits)
            c.keys, c.values = list(mx.quantize(k, kv.group_size, kv.bits)), list(mx.quantize(v, kv.group_size, kv.bits))
        c.offset = 5
        mx.eval(c.state)
        return c

    def arrays(cache):
        return [cache.keys, cache.values] if kv.bits is None else [*cache.keys, *cache.values]

    for kv in (KVSettings(), KVSettings(bits=8, group_size=32)):
        root = tmp_path / f"bits{kv.bits}"
        (root / "blocks").mkdir(parents=True)
        writer = DiskTier(root, "epoch-a", kv)
        layers = [layer(kv, 10 * j) for j in range(2)]
        writer.write(7, -1, layers)
        writer.close()
        reader = DiskTier(root, "epoch-a", kv)
        (got,) = reader.read(-1, [7])
        for want_layer, got_layer in zip(layers, got):
            assert got_layer.offset == 5
            for a, b in zip(arrays(want_layer), arrays(got_layer)):
                assert a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()
        assert DiskTier(root, "epoch-b", kv).read(-1, [7]) == [] and reader.read(3, [7]) == []
        path = root / "blocks" / "7.kv"
        data = path.read_bytes()
        path.write_bytes(data[:-1])
        assert reader.read(-1, [7]) == []
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
        assert reader.read(-1, [7]) == [] and reader.stats["read_failures"] == 3
