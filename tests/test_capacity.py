"""Capacity planner numbers against bytes computed by hand from published model shapes."""

from __future__ import annotations

import json

import pytest

from mlx_kvshard.hardware import profiles
from mlx_kvshard.planner import capacity
from mlx_kvshard.planner.capacity import GIB, Host, Options
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.errors import UserError
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.hardware.profiles import ChipProfile, LinkProfile

LLAMA3_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                  tie_word_embeddings=False, torch_dtype="bfloat16", max_position_embeddings=8192)
LLAMA31_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                  tie_word_embeddings=False, torch_dtype="bfloat16", max_position_embeddings=131072)
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                 tie_word_embeddings=False, torch_dtype="bfloat16", max_position_embeddings=32768)


def cfg(d):
    return ModelConfig.from_dict(d)


def chip(bw_gbs=273.0, name="m4pro", tb=5):
    return ChipProfile(name, name, bw_gbs * 1e9, tb, (24.0, 48.0, 64.0))


def link(alpha_us=10.0, gbps=8.0, algorithm="ring", mesh_max=0):
    return LinkProfile("test", "test link", "ring", algorithm, alpha_us * 1e-6, gbps * 1e9 / 8, mesh_max)


# ---- whole-model bytes, by hand: params of one layer, times layers, plus embeddings -------------
# Llama-3-70B: q,o 8192x8192; k,v 1024x8192; gate/up/down 8192x28672; 2 norms of 8192
L70_LAYER = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192
L70_PARAMS = 80 * L70_LAYER + 2 * 128256 * 8192 + 8192  # untied embed + lm_head, final norm
# Llama-3.1-8B: q,o 4096x4096; k,v 1024x4096; MLP 4096x14336
L8_PARAMS = 32 * (2 * 4096**2 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096) + 2 * 128256 * 4096 + 4096
# Qwen2.5-7B: q,o 3584x3584; k,v 512x3584; q/k/v bias 3584+512+512; MLP 3584x18944
Q7_PARAMS = (28 * (2 * 3584**2 + 2 * 512 * 3584 + (3584 + 2 * 512) + 3 * 3584 * 18944 + 2 * 3584)
             + 2 * 152064 * 3584 + 3584)


@pytest.mark.parametrize("shape, params, kv_per_token", [
    (LLAMA3_70B, L70_PARAMS, 2 * 80 * 8 * 128 * 2),
    (LLAMA31_8B, L8_PARAMS, 2 * 32 * 8 * 128 * 2),
    (QWEN25_7B, Q7_PARAMS, 2 * 28 * 4 * 128 * 2),
])
def test_whole_model_bytes_match_hand_count(shape, params, kv_per_token):
    plan = ShardPlan.build(cfg(shape), 1)
    assert plan.weight_bytes(0) == 2 * params  # bf16
    assert capacity.kv_bytes_per_token(plan, 0) == kv_per_token
    assert capacity.kv_bytes(plan, 0, context=8192, batch=2) == 2 * 8192 * kv_per_token


def test_published_parameter_counts():
    # the hand counts are the models' published sizes: 70.55B, 8.03B, 7.62B
    assert L70_PARAMS == 70_553_706_496
    assert L8_PARAMS == 8_030_261_248
    assert Q7_PARAMS == 7_615_616_512


def test_llama3_70b_two_ranks_split_in_half():
    plan = ShardPlan.build(cfg(LLAMA3_70B), 2)
    # each rank: 32 q heads, 4 KV heads, half the MLP; embeddings and norms whole
    layer = 2 * 4096 * 8192 + 2 * 512 * 8192 + 3 * 8192 * 14336 + 2 * 8192
    per_rank = 2 * (80 * layer + 2 * 128256 * 8192 + 8192)
    assert [plan.weight_bytes(r) for r in (0, 1)] == [per_rank, per_rank] == [72_656_371_712] * 2
    assert capacity.kv_bytes_per_token(plan, 0) == 2 * 80 * 4 * 128 * 2


def test_quantized_kv_bytes_use_group_64_scales_and_biases():
    plan = ShardPlan.build(cfg(LLAMA3_70B), 1)
    elements = 2 * 80 * 8 * 128
    # bits/8 per element, plus a bf16 scale and bias per 64 elements
    assert capacity.kv_bytes_per_token(plan, 0, kv_bits=8) == elements + elements // 64 * 4 == 174_080
    assert capacity.kv_bytes_per_token(plan, 0, kv_bits=4) == elements // 2 + elements // 64 * 4 == 92_160


def test_quantized_kv_needs_head_dim_multiple_of_group():
    odd = cfg(dict(LLAMA31_8B, head_dim=96))
    with pytest.raises(UserError, match="head_dim 96"):
        capacity.kv_bytes_per_token(ShardPlan.build(odd, 1), 0, kv_bits=4)


# ---- memory fit and largest context ---------------------------------------------------------
def test_usable_memory_rule():
    assert capacity.usable_bytes(Host("a", 16)) == int(16 * GIB * 2 / 3)
    assert capacity.usable_bytes(Host("a", 36)) == int(36 * GIB * 2 / 3)
    assert capacity.usable_bytes(Host("a", 64)) == 48 * GIB
    assert capacity.usable_bytes(Host("a", 64), fraction=0.9) == int(64 * GIB * 0.9)
    assert capacity.usable_bytes(Host("a")) is None


def test_fit_and_largest_context_by_hand():
    hosts = [Host("a", 96), Host("b", 96)]
    ev = capacity.evaluate(cfg(LLAMA3_70B), hosts, None, Options(context=8192))
    weights, kv_per_token = 72_656_371_712, 163_840
    room = 72 * GIB - 1 * GIB - weights  # 3/4 of 96 GB, minus 1 GiB overhead
    for f in ev.fits:
        assert f.weight_bytes == weights
        assert f.kv_bytes == 8192 * kv_per_token
        assert f.headroom_bytes == room - 8192 * kv_per_token
        assert f.fits
        assert f.max_context == room // kv_per_token == 21_846
    assert ev.max_context == (21_846, 0)
    # batch 4 divides the context budget by 4
    ev4 = capacity.evaluate(cfg(LLAMA3_70B), hosts, None, Options(context=8192, batch=4))
    assert ev4.max_context[0] == room // (4 * kv_per_token)


def test_memory_weights_the_split():
    ev = capacity.evaluate(cfg(LLAMA3_70B), [Host("big", 128), Host("small", 32)], None, Options())
    assert ev.plan.shares == [96.0, pytest.approx(32 * 2 / 3)]
    assert ev.plan.shards[0].local_kv_heads > ev.plan.shards[1].local_kv_heads


def test_model_that_cannot_fit_says_so_with_numbers():
    hosts = [Host("a", 24, chip()), Host("b", 24, chip())]
    opts = Options(context=8192)
    ev = capacity.evaluate(cfg(LLAMA3_70B), hosts, link(), opts)
    f = ev.fits[0]
    assert not ev.fits_all and f.fits is False
    assert f.headroom_bytes == int(24 * GIB * 2 / 3) - GIB - 72_656_371_712 - 8192 * 163_840
    assert f.max_context == 0
    d = capacity.decide(cfg(LLAMA3_70B), ev, link(), opts)
    assert d.choice == "neither"
    # whole-model need: 141.1 GB of weights + 2.5 GiB KV + 1 GiB overhead, in GiB
    assert "needs 134.9 GiB at context 8192" in d.reason
    assert "16.0 GiB usable" in d.reason and "short by" in d.reason
    # each 24 GB Mac: 15 GiB after overhead, 3.9 GiB of it the replicated embed + lm_head, so at
    # least 127.5 GiB of layers + 2.5 GiB KV over 11.1 GiB per Mac: 12 or more
    assert d.macs_needed >= 12
    like = Host("a", 24)
    assert capacity.evaluate(cfg(LLAMA3_70B), [like] * d.macs_needed, None, opts).fits_all
    assert not capacity.evaluate(cfg(LLAMA3_70B), [like] * (d.macs_needed - 1), None, opts).fits_all


def test_decision_cluster_when_one_mac_is_too_small():
    hosts = [Host("s1", 96, chip(819)), Host("s2", 96, chip(819))]
    opts = Options(context=8192)
    ev = capacity.evaluate(cfg(LLAMA3_70B), hosts, link(), opts)
    d = capacity.decide(cfg(LLAMA3_70B), ev, link(), opts)
    assert d.choice == "cluster" and d.macs_needed == 2
    assert "72.0 GiB usable" in d.reason and "2 Macs like s1" in d.reason


def test_decision_single_when_it_fits_and_the_link_costs_more():
    # a 4-bit 8B model reads ~4.5 GB per token: 160 us TCP steps cost more than halving that
    q4 = cfg(dict(LLAMA31_8B, quantization={"bits": 4, "group_size": 64}))
    tcp = link(alpha_us=150, gbps=16)
    hosts = [Host("m1", 64, chip()), Host("m2", 64, chip())]
    opts = Options(context=4096)
    ev = capacity.evaluate(q4, hosts, tcp, opts)
    d = capacity.decide(q4, ev, tcp, opts)
    assert d.choice == "single"
    s, c = d.single.prediction["tokens_per_second"], ev.prediction["tokens_per_second"]
    assert s > c and f"{s / c:.2f}x as fast as the cluster" in d.reason


def test_decision_cluster_when_faster():
    rdma = link(alpha_us=5, gbps=50)
    hosts = [Host("u1", 256, chip(819)), Host("u2", 256, chip(819))]
    opts = Options(context=8192)
    ev = capacity.evaluate(cfg(LLAMA3_70B), hosts, rdma, opts)
    d = capacity.decide(cfg(LLAMA3_70B), ev, rdma, opts)
    assert d.choice == "cluster" and "as fast as u1 alone" in d.reason


def test_decision_unknown_without_memory():
    ev = capacity.evaluate(cfg(LLAMA31_8B), [Host("a"), Host("b")], None, Options())
    assert ev.fits_all is None and ev.max_context is None
    assert capacity.decide(cfg(LLAMA31_8B), ev, None, Options()).choice == "unknown"


# ---- communication -----------------------------------------------------------------------------
def test_allreduce_seconds_ring_and_mesh():
    ring = link(alpha_us=10, gbps=8)  # 1e9 B/s
    assert capacity.allreduce_seconds(ring, 1, 1e6) == 0.0
    # 2(N-1) steps of alpha, and 2(N-1)/N of the payload at link bandwidth
    assert capacity.allreduce_seconds(ring, 4, 1e6) == pytest.approx(6 * 10e-6 + 1.5 * 1e6 / 1e9)
    mesh = link(alpha_us=30, gbps=8, algorithm="mesh", mesh_max=32768)
    assert capacity.allreduce_seconds(mesh, 3, 16384) == pytest.approx(30e-6 + 16384 / 1e9)
    assert capacity.allreduce_seconds(mesh, 3, 1e6) == pytest.approx(4 * 30e-6 + 4 / 3 * 1e6 / 1e9)


def test_bytes_per_token_head_sharded_vs_kv_allgather():
    plan = ShardPlan.build(cfg(LLAMA3_70B), 3)
    comm = capacity.comm_per_token(plan, Options(context=8192, batch=1), link())
    tp, kv = comm["head_sharded"], comm["kv_allgather"]
    payload = 1 * 8192 * 2  # one bf16 hidden vector per sequence
    assert tp["collectives_per_token"] == 2 * 80
    assert tp["payload_bytes_per_collective"] == payload
    assert tp["payload_bytes_per_token"] == 2 * 80 * payload == 2_621_440
    assert tp["wire_bytes_per_rank_per_token"] == pytest.approx(2_621_440 * 4 / 3)  # ring, N=3
    kv_wire = 2 * 80 * 8 * 128 * 8192 * 2 * 2 / 3
    assert kv["wire_bytes_per_rank_per_token"] == pytest.approx(kv_wire)
    assert comm["ratio_kv_allgather_to_head_sharded"] == pytest.approx(kv_wire / (2_621_440 * 4 / 3))
    # the head-sharded bytes do not grow with the context; the all-gathered cache does
    long = capacity.comm_per_token(plan, Options(context=65536), link())
    assert long["head_sharded"]["wire_bytes_per_rank_per_token"] == tp["wire_bytes_per_rank_per_token"]
    assert long["kv_allgather"]["wire_bytes_per_rank_per_token"] == pytest.approx(8 * kv_wire)


def test_mesh_sends_the_payload_to_each_peer():
    plan = ShardPlan.build(cfg(LLAMA3_70B), 3)
    mesh = link(algorithm="mesh", mesh_max=32768)
    tp = capacity.comm_per_token(plan, Options(), mesh)["head_sharded"]
    assert tp["wire_bytes_per_rank_per_token"] == 2 * 2_621_440


# ---- prediction ----------------------------------------------------------------------------------
def test_predict_decode_single_mac_by_hand():
    plan = ShardPlan.build(cfg(LLAMA31_8B), 1)
    p = capacity.predict_decode(plan, context=4096, batch=1, link=None, chips=chip(273), eta=0.7, t_fixed=1e-3)
    # a decode step reads every weight but the untied embedding table, and the whole KV cache
    read = 2 * (L8_PARAMS - 128256 * 4096) + 4096 * 131_072
    assert p["per_rank"][0]["bytes_read"] == read
    assert p["seconds_per_token"] == pytest.approx(read / (0.7 * 273e9) + 1e-3)
    assert p["link_seconds"] == 0 and p["collectives_per_token"] == 0


def test_predict_decode_two_ranks_adds_2L_allreduces():
    plan = ShardPlan.build(cfg(LLAMA31_8B), 2)
    lk = link(alpha_us=29, gbps=50)
    p = capacity.predict_decode(plan, 4096, 1, lk, [chip(273), chip(273)], eta=0.7, t_fixed=1e-3)
    t_ar = 2 * 29e-6 + 1 * 8192 / (50e9 / 8)  # N=2 ring: 2 steps, payload 4096 bf16 values
    assert p["allreduce_seconds"] == pytest.approx(t_ar)
    assert p["link_seconds"] == pytest.approx(64 * t_ar)
    read = max(r["bytes_read"] for r in p["per_rank"])
    assert p["seconds_per_token"] == pytest.approx(read / (0.7 * 273e9) + 64 * t_ar + 1e-3)
    assert p["tokens_per_second"] == pytest.approx(1 / p["seconds_per_token"])


def test_predict_speculative_by_hand():
    """A verify step of k+1 positions reads the weights once and runs 2·L all_sums of k+1
    positions, for 1 + a + ... + a^k tokens."""
    plan = ShardPlan.build(cfg(LLAMA31_8B), 2)
    lk = link(alpha_us=29, gbps=50)
    plain = capacity.predict_decode(plan, 4096, 1, lk, [chip(273)] * 2, eta=0.7, t_fixed=1e-3)
    s = capacity.predict_speculative(plan, 4096, lk, [chip(273)] * 2, accept=0.5, num_draft=3, eta=0.7, t_fixed=1e-3)
    t_ar = 2 * 29e-6 + 1 * 4 * 8192 / (50e9 / 8)  # payload: 4 positions of 4096 bf16 values
    assert s["tokens_per_step"] == pytest.approx(1.875)
    assert s["seconds_per_step"] == pytest.approx(plain["memory_seconds"] + 64 * t_ar + 1e-3)
    assert s["tokens_per_second"] == pytest.approx(1.875 / s["seconds_per_step"])
    assert s["collectives_per_generated_token"] == pytest.approx(64 / 1.875)
    assert 1 < s["speedup"] < 1.875
    # a draft model adds its reads on rank 0 and one all_sum sharing its proposals
    d = capacity.predict_speculative(plan, 4096, lk, [chip(273)] * 2, 0.5, 3, draft_bytes=1e9, eta=0.7, t_fixed=1e-3)
    assert d["draft_seconds"] == pytest.approx(3e9 / (0.7 * 273e9)) and d["collectives_per_step"] == 65
    # nothing accepted on one Mac: a step is a plain token, no faster
    one = capacity.predict_speculative(ShardPlan.build(cfg(LLAMA31_8B), 1), 4096, None, chip(273), 0.0, 3)
    assert one["tokens_per_step"] == 1 and one["speedup"] == pytest.approx(1.0)


def test_slowest_chip_limits_the_token():
    plan = ShardPlan.build(cfg(LLAMA31_8B), 2)
    p = capacity.predict_decode(plan, 4096, 1, link(), [chip(819), chip(120)])
    assert p["limiting_rank"] == 1


# ---- profiles --------------------------------------------------------------------------------------
def test_shipped_profiles_load_with_sources():
    assert {"tb4-ring", "tb5-ring", "tb5-rdma", "10gbe"} <= set(profiles.available("links"))
    assert {"m4", "m4pro", "m4max", "m3ultra"} <= set(profiles.available("chips"))
    for name in profiles.available("links"):
        lk = profiles.load_link(name)
        assert lk.alpha_s > 0 and lk.bandwidth_Bps > 0 and lk.sources["alpha_us"]
    bandwidth = {n: profiles.load_chip(n).mem_bandwidth_Bps / 1e9 for n in profiles.available("chips")}
    assert bandwidth["m4"] == 120 and bandwidth["m4pro"] == 273 and bandwidth["m3ultra"] == 819
    assert bandwidth["m4max"] == 546 and bandwidth["m4max-410"] == 410


@pytest.fixture
def configs_dir(tmp_path, monkeypatch):
    (tmp_path / "links").mkdir()
    (tmp_path / "chips").mkdir()
    monkeypatch.setattr(profiles, "CONFIGS_DIR", tmp_path)
    return tmp_path


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


GOOD_LINK = {"name": "x", "description": "x", "backend": "ring", "algorithm": "ring",
             "alpha_us": {"value": 10, "source": "estimate"}, "bandwidth_gbps": {"value": 10, "source": "estimate"}}


def test_unknown_profile_lists_the_available_ones(configs_dir):
    _write(configs_dir / "links" / "good.json", GOOD_LINK)
    with pytest.raises(UserError, match=r"unknown link profile 'tb9'; available: good"):
        profiles.load_link("tb9")


@pytest.mark.parametrize("broken, message", [
    ("{not json", "not valid JSON"),
    (dict(GOOD_LINK, alpha_us=10), r"field 'alpha_us' must be \{"),
    (dict(GOOD_LINK, alpha_us={"value": 10}), "field 'alpha_us' has no source"),
    (dict(GOOD_LINK, bandwidth_gbps={"value": "fast", "source": "me"}), "field 'bandwidth_gbps' value must be a number"),
    (dict(GOOD_LINK, bandwidth_gbps={"value": -1, "source": "me"}), "field 'bandwidth_gbps' value must be positive"),
    (dict(GOOD_LINK, algorithm="tree"), "field 'algorithm' must be one of ring, mesh"),
    (dict(GOOD_LINK, algorithm="mesh"), "field 'mesh_max_bytes'"),
    ({k: v for k, v in GOOD_LINK.items() if k != "backend"}, "field 'backend'"),
])
def test_malformed_link_profile_names_file_and_field(configs_dir, broken, message):
    path = configs_dir / "links" / "bad.json"
    _write(path, broken)
    with pytest.raises(UserError, match=message) as e:
        profiles.load_link("bad")
    assert str(path) in str(e.value)


def test_malformed_chip_profile_names_file_and_field(configs_dir):
    path = configs_dir / "chips" / "bad.json"
    _write(path, {"name": "bad", "mem_bandwidth_gbs": {"value": 273, "source": "apple"},
                  "thunderbolt": {"value": 5, "source": "apple"}})
    with pytest.raises(UserError, match="field 'memory_options_gb'") as e:
        profiles.load_chip("bad")
    assert str(path) in str(e.value)


def test_profile_by_path(tmp_path):
    path = tmp_path / "mine.json"
    _write(path, GOOD_LINK)
    assert profiles.load_link(str(path)).bandwidth_Bps == 10e9 / 8


@pytest.mark.parametrize("opts, message", [
    (Options(context=0), "--context and --batch"),
    (Options(batch=0), "--context and --batch"),
    (Options(kv_bits=2), "--kv-bits must be one of 16, 8, 4"),
    (Options(eta=1.5), "--eta"),
    (Options(usable_fraction=0), "--usable-fraction"),
    (Options(overhead_gb=-1), "must not be negative"),
])
def test_bad_numbers_are_user_errors(opts, message):
    with pytest.raises(UserError, match=message):
        opts.check()
