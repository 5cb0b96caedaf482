"""ShardPlan: which heads, query heads and MLP columns each rank owns."""

import pytest

from mlx_kvshard.config import ModelConfig
from mlx_kvshard.errors import UserError
from mlx_kvshard.plan import ShardPlan, split_counts


def cfg(n_heads=64, n_kv=8, hidden=8192, inter=28672, layers=80, quant=None, **kw):
    d = dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
             num_attention_heads=n_heads, num_key_value_heads=n_kv, vocab_size=128256,
             tie_word_embeddings=False, torch_dtype="bfloat16", **kw)
    if quant:
        d["quantization"] = {"bits": quant[0], "group_size": quant[1]}
    return ModelConfig.from_dict(d)


def covers(ranges, total):
    """Contiguous, disjoint, complete cover of [0, total)."""
    pos = 0
    for a, b in ranges:
        assert a == pos and b > a
        pos = b
    assert pos == total


def test_split_counts():
    assert split_counts(8, [1, 1, 1]) == [3, 3, 2]
    assert split_counts(8, [64, 24, 16]) == [5, 2, 1]
    assert split_counts(4, [100, 1, 1]) == [2, 1, 1]  # everyone keeps at least one
    with pytest.raises(ValueError):
        split_counts(2, [1, 1, 1])


def test_even_split():
    plan = ShardPlan.build(cfg(), 4)
    assert [s.local_kv_heads for s in plan.shards] == [2, 2, 2, 2]
    assert [s.q_heads for s in plan.shards] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    covers([s.mlp_cols for s in plan.shards], 28672)
    assert len({plan.weight_bytes(r) for r in range(4)}) == 1
    assert not plan.notes


def test_uneven_split_three_ranks_eight_kv_heads():
    plan = ShardPlan.build(cfg(), 3)
    assert [s.local_kv_heads for s in plan.shards] == [3, 3, 2]
    # query heads follow their KV heads in whole GQA groups (ratio 8)
    assert [s.q_heads for s in plan.shards] == [(0, 24), (24, 48), (48, 64)]
    covers([s.mlp_cols for s in plan.shards], 28672)
    # the rank with fewer heads takes more MLP columns, so weight bytes stay balanced
    assert plan.shards[2].local_mlp_cols > plan.shards[0].local_mlp_cols
    w = [plan.weight_bytes(r) for r in range(3)]
    assert max(w) / min(w) < 1.01
    assert plan.kv_bytes_per_token(0) == 2 * 80 * 3 * 128 * 2
    assert plan.kv_bytes_per_token(2) == 2 * 80 * 2 * 128 * 2
    assert "uneven split [3, 3, 2]" in plan.notes[0]


def test_weighted_split_follows_memory():
    plan = ShardPlan.build(cfg(), 3, shares=[64, 24, 16])
    assert [s.local_kv_heads for s in plan.shards] == [5, 2, 1]
    w = [plan.weight_bytes(r) for r in range(3)]
    assert w[0] > w[1] > w[2]
    # bytes track the weights to within the granularity of one KV group
    share = [x / sum(w) for x in w]
    assert share == pytest.approx([64 / 104, 24 / 104, 16 / 104], abs=0.03)


def test_world_larger_than_kv_heads_replicates_and_splits_queries():
    plan = ShardPlan.build(cfg(), 12)
    heads = [s.kv_heads for s in plan.shards]
    assert heads[:8] == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4), (3, 4)]
    assert [s.kv_sharers for s in plan.shards] == [2] * 8 + [1] * 4
    assert plan.shards[0].q_heads == (0, 4) and plan.shards[1].q_heads == (4, 8)
    covers([s.q_heads for s in plan.shards], 64)
    assert "replicated" in plan.notes[0]


def test_infeasible_world_says_why():
    with pytest.raises(UserError, match=r"world 5 needs up to 2 ranks per KV head.*at most 4 ranks"):
        ShardPlan.build(cfg(n_heads=4, n_kv=4, hidden=256, inter=512), 5)


def test_quantized_columns_on_group_boundaries():
    plan = ShardPlan.build(cfg(quant=(4, 64)), 3)
    for s in plan.shards:
        assert s.mlp_cols[0] % 64 == 0 and s.mlp_cols[1] % 64 == 0
    covers([s.mlp_cols for s in plan.shards], 28672)
    # packed 4-bit weights + fp16 scale and bias per 64 values
    q = plan.layer_bytes(0)
    assert q < ShardPlan.build(cfg(), 3).layer_bytes(0) / 3


def test_per_module_quantization_in_bytes_and_alignment():
    """mlx-lm's per-module entries: the embedding at 8 bits, one down_proj at group 128, one layer's
    q_proj left unquantized (false); every other module takes the 4-bit group-64 defaults."""
    d = dict(model_type="llama", hidden_size=8192, num_hidden_layers=4, intermediate_size=28672,
             num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
             torch_dtype="bfloat16",
             quantization={"bits": 4, "group_size": 64, "model.embed_tokens": {"bits": 8, "group_size": 64},
                           "model.layers.2.mlp.down_proj": {"bits": 8, "group_size": 128},
                           "model.layers.1.self_attn.q_proj": False})
    c = ModelConfig.from_dict(d)
    assert c.quant_for("model.layers.1.self_attn.q_proj") is None
    assert c.quant_for("model.embed_tokens").bits == 8
    assert c.quant_for("model.layers.0.mlp.down_proj").bits == 4
    plan = ShardPlan.build(c, 3)
    for s in plan.shards:  # the MLP split follows the widest down_proj group of any layer
        assert s.mlp_cols[0] % 128 == 0
    # every module at the defaults (the group-128 down_proj kept)
    d["quantization"] = {"bits": 4, "group_size": 64, "model.layers.2.mlp.down_proj": {"bits": 4, "group_size": 128}}
    uniform = ShardPlan.build(ModelConfig.from_dict(d), 3)
    # the unquantized q_proj slice (bf16) costs more than its 4-bit version
    q_rows = plan.shards[0].local_q_heads * 128
    extra_q = q_rows * 8192 * 2 - (q_rows * 8192 // 2 + q_rows * 8192 // 64 * 4)
    assert plan._attention_bytes(plan.shards[0], 1) - uniform._attention_bytes(uniform.shards[0], 1) == extra_q
    # the 8-bit embedding: twice the packed bytes, same scales and biases
    assert plan.replicated_bytes() - uniform.replicated_bytes() == 128256 * 8192 // 2
    assert plan.weight_bytes(0) == sum(plan.layer_bytes(0, i) for i in range(4)) + plan.replicated_bytes()


def test_quantization_mode_other_than_mlx_is_refused():
    d = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
             num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
             quantization={"bits": 4, "group_size": 32, "mode": "fp3"})
    with pytest.raises(UserError, match="mode 'fp3', which MLX cannot run"):
        ModelConfig.from_dict(d)
    d["quantization"] = {"bits": 4, "group_size": 32, "mode": "mxfp4"}
    plan = ShardPlan.build(ModelConfig.from_dict(d), 1)
    # mxfp4: packed 4-bit values and one 8-bit scale per 32, no biases
    assert plan.replicated_bytes() == 1000 * 256 // 2 + 1000 * 256 // 32 + 256 * 2


def test_quantized_head_split_off_group_boundary_is_refused():
    # head_dim 16 with group 64: a rank starting at query head 2 starts o_proj at column 32
    c = cfg(n_heads=8, n_kv=8, hidden=128, inter=256, layers=2, quant=(4, 64))
    with pytest.raises(UserError, match="quantization group size 64"):
        ShardPlan.build(c, 3)


def test_bad_weights_and_world():
    with pytest.raises(UserError, match="3 rank shares for a world of 2"):
        ShardPlan.build(cfg(), 2, shares=[1, 2, 3])
    with pytest.raises(UserError, match="positive"):
        ShardPlan.build(cfg(), 2, shares=[1, 0])
    with pytest.raises(UserError, match="at least 1"):
        ShardPlan.build(cfg(), 0)


def test_config_errors():
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_dict({"model_type": "gpt2"})
    with pytest.raises(UserError, match="missing required field"):
        ModelConfig.from_dict({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(UserError, match="not a multiple"):
        cfg(n_heads=6, n_kv=4)


def test_summary_table_names_every_rank():
    text = ShardPlan.build(cfg(), 3).table()
    assert "KV heads" in text and "query heads" in text and "KV / 1K tok" in text
    assert len([l for l in text.splitlines() if l.strip()[:1].isdigit()]) == 3


def test_vocab_parallel_splits_lm_head_rows():
    full = ShardPlan.build(cfg(), 3)
    vp = ShardPlan.build(cfg(), 3, vocab_parallel=True)
    covers([s.vocab_rows for s in vp.shards], 128256)
    lm_head = 128256 * 8192 * 2
    # each rank stores and reads a third of the (untied) lm_head instead of all of it
    assert full.weight_bytes(0) - vp.weight_bytes(0) == lm_head - 42752 * 8192 * 2
    assert full.decode_read_bytes(0) - vp.decode_read_bytes(0) == lm_head - 42752 * 8192 * 2
    # one rank: nothing to split
    assert ShardPlan.build(cfg(), 1, vocab_parallel=True).shards[0].vocab_rows is None


# ---- KV: quantized bytes, sequence sharding, the KV reserve ---------------------------------
from mlx_kvshard.settings import KVSettings  # noqa: E402


def test_sequence_mode_gives_every_sharer_the_whole_group_and_a_share_of_positions():
    plan = ShardPlan.build(cfg(), 12, kv=KVSettings(shard="sequence"))
    assert plan.kv.shard == "sequence" and plan.sequence_sharded
    s0, s1, s8 = plan.shards[0], plan.shards[1], plan.shards[8]
    assert s0.kv_heads == s1.kv_heads == (0, 1) and s0.q_heads == s1.q_heads == (0, 8)
    assert (s0.seq_sharers, s0.seq_index, s1.seq_index, s1.seq_first_rank) == (2, 0, 1, 0)
    assert (s8.seq_sharers, s8.kv_heads, s8.q_heads) == (1, (4, 5), (32, 40))
    # positions interleave: 1001 tokens -> 501 and 500
    assert plan.kv_positions(0, 1001) == 501 and plan.kv_positions(1, 1001) == 500
    assert plan.kv_bytes(1, 1000) == 500 * 2 * 80 * 128 * 2
    # the largest context whose KV fits inverts kv_bytes
    free = plan.kv_bytes(1, 1000)
    assert plan.max_context(1, free) == 1001 and plan.kv_bytes(1, 1001) <= free < plan.kv_bytes(1, 1003)


def test_sequence_shares_weight_each_sharers_positions():
    """--shares 3,1 on the two sharers of a head: 3 of every 4 positions on the first,
    interleaved; held counts, positions and admission all follow the same cycle."""
    from mlx_kvshard.plan import sequence_cycle

    assert sequence_cycle([1, 1, 1]) == (0, 1, 2)  # even: position p on sharer p mod s
    assert sequence_cycle([3, 1]) == (0, 0, 1, 0) and sequence_cycle([64, 16]) == (0, 0, 1, 0, 0)
    cycle = sequence_cycle([24, 16, 16])  # not a small integer ratio: within 1%
    assert [cycle.count(i) / len(cycle) for i in range(3)] == pytest.approx([24 / 56, 16 / 56, 16 / 56], abs=0.01)
    plan = ShardPlan.build(cfg(), 16, [3, 1] + [1] * 14, kv=KVSettings(shard="sequence"))
    s0, s1 = plan.shards[:2]
    assert s0.seq_cycle == s1.seq_cycle == (0, 0, 1, 0) and plan.shards[2].seq_cycle == (0, 1)
    for s in (s0, s1):
        held = [p for p in range(1001) if s.seq_owns(p)]
        assert [s.seq_position(j) for j in range(len(held))] == held
        assert all(s.seq_held(n) == sum(p < n for p in held) for n in range(0, 1001, 7))
    assert (plan.kv_positions(0, 1000), plan.kv_positions(1, 1000)) == (750, 250)
    assert any("split its positions 3:1" in n for n in plan.notes)
    # admission: rank 1 holds a quarter of each row, rank 0 three quarters (less a cycle's slots per row)
    assert plan.admission_tokens(1, 1000, rows=4) == (1000 - 4) * 4
    assert plan.admission_tokens(0, 1000, rows=4) == (1000 - 12) * 4 // 3
    assert plan.admission_tokens(0, 1000, rows=4) == 1317 and ShardPlan.build(cfg(), 4).admission_tokens(0, 1000, 4) == 1000


def test_sequence_mode_at_twice_the_kv_heads_halves_kv_per_rank():
    rep = ShardPlan.build(cfg(), 16)
    seq = ShardPlan.build(cfg(), 16, kv=KVSettings(shard="sequence"))
    assert [seq.kv_bytes(r, 4096) for r in range(16)] == [rep.kv_bytes(0, 4096) // 2] * 16
    # replicate cannot go past n_heads ranks; sequence can
    ShardPlan.build(cfg(n_heads=16, n_kv=8), 24, kv=KVSettings(shard="sequence"))
    with pytest.raises(UserError, match="--kv-shard sequence"):
        ShardPlan.build(cfg(n_heads=16, n_kv=8), 24)


def test_auto_picks_replicate_at_short_context_and_sequence_at_long():
    short = ShardPlan.build(cfg(), 16, kv=KVSettings(shard="auto"), context=16)
    long = ShardPlan.build(cfg(), 16, kv=KVSettings(shard="auto"), context=131072)
    assert short.kv.shard == "replicate" and long.kv.shard == "sequence"
    assert "auto chose sequence" in long.notes[-1]


def test_quantized_kv_bytes_per_position():
    elements = 2 * 80 * 3 * 128
    p8 = ShardPlan.build(cfg(), 3, kv=KVSettings(bits=8))
    p4 = ShardPlan.build(cfg(), 3, kv=KVSettings(bits=4, group_size=32))
    assert p8.kv_bytes_per_token(0) == elements + elements // 64 * 2 * 2
    assert p4.kv_bytes_per_token(0) == elements // 2 + elements // 32 * 2 * 2
    with pytest.raises(UserError, match="head_dim 96"):
        ShardPlan.build(cfg(head_dim=96), 1, kv=KVSettings(bits=4))


def test_kv_reserve_gives_the_rank_with_fewer_heads_more_mlp():
    plain = ShardPlan.build(cfg(), 3)
    reserved = ShardPlan.build(cfg(), 3, context=131072)
    assert reserved.shards[2].local_mlp_cols > plain.shards[2].local_mlp_cols
    need = [reserved.weight_bytes(r) + reserved.kv_bytes(r, 131072) for r in range(3)]
    plain_need = [plain.weight_bytes(r) + plain.kv_bytes(r, 131072) for r in range(3)]
    assert max(need) - min(need) < max(plain_need) - min(plain_need)
    assert max(need) < max(plain_need)
