"""Attention over a KV head whose positions are split across ranks (sequence-sharded KV).

Each sharer attends with all of the group's query heads over the positions it holds and
returns its partial output o_i with the log-sum-exp lse_i of its scores. The exact result
is sum_i exp(lse_i - LSE) * o_i with LSE = logsumexp_i lse_i: one all_gather of the LSEs
gives every sharer its weight, it scales o_i before its o_proj columns, and the all_sum
after o_proj adds the sharers' parts. MLX's fused SDPA returns no LSE, so these heads
compute attention directly.
"""

from __future__ import annotations

import mlx.core as mx

from ..plan import RankShard
from .dist import Comm


def rotate_heads(x: mx.array) -> mx.array:
    """An orthonormal Hadamard transform along head_dim (its own inverse). Applied to q, k and v
    before the cache and to the attention output after it, it leaves attention unchanged but
    spreads each head's outlier channels over all of them, so a quantized cache loses less
    (QuaRot). Per head and position: world N computes what world 1 does."""
    return mx.hadamard_transform(x, scale=x.shape[-1] ** -0.5)


def partial_attention(queries: mx.array, keys, values, scale: float, quantization: tuple[int, int] | None = None,
                      q_pos: mx.array | None = None, k_pos: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Attention of `queries` (B, Hq, L, D) over the stored `keys`/`values` (B, Hkv, n, D),
    or mlx-lm's quantized (packed, scales, biases) triples. With absolute positions `q_pos`
    (L,), or per batch row (B, L), and `k_pos` (n,), a query sees the keys at or before its
    position; without them it sees every key (a decode step: all stored positions precede it). Returns (out, lse) with out
    (B, Hq, L, D) normalised over these keys only and lse (B, Hq, L) in float32
    (-inf, with out 0, for a query that sees none of them)."""
    B, n_q, L, D = queries.shape
    if keys is None:  # this rank holds no position yet
        return mx.zeros(queries.shape, queries.dtype), mx.full((B, n_q, L), -mx.inf, mx.float32)
    n_kv = (keys[0] if quantization else keys).shape[1]
    q = (queries * scale).reshape(B, n_kv, n_q // n_kv, L, D)
    if quantization:
        group_size, bits = quantization
        keys, values = ([mx.expand_dims(x, 2) for x in t] for t in (keys, values))
        scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=bits)
    else:
        scores = q @ mx.expand_dims(keys, 2).swapaxes(-1, -2)
    scores = scores.astype(mx.float32)
    if q_pos is not None:
        visible = k_pos <= q_pos[..., None]  # (L, n), or per row (B, L, n)
        if visible.ndim == 3:
            visible = visible[:, None, None]
        scores = mx.where(visible, scores, -mx.inf)
    m = scores.max(axis=-1, keepdims=True)
    m = mx.where(m == -mx.inf, 0.0, m)  # a query with no visible key: exp(-inf) = 0 below
    p = mx.exp(scores - m)
    total = p.sum(axis=-1, keepdims=True)
    p = (p / mx.where(total > 0, total, 1.0)).astype(queries.dtype)
    if quantization:
        out = mx.quantized_matmul(p, *values, transpose=False, group_size=group_size, bits=bits)
    else:
        out = p @ mx.expand_dims(values, 2)
    lse = (mx.log(total) + m).squeeze(-1)
    return out.reshape(B, n_q, L, D), lse.reshape(B, n_q, L)


def merge_weights(lse: mx.array, shard: RankShard, comm: Comm) -> mx.array:
    """exp(lse_i - LSE) over this rank's sharers, from one all_gather of every rank's LSEs
    (the ring backend cannot gather within a subgroup: ranks that share nothing send theirs
    too, and they are ignored)."""
    every = comm.all_gather(lse[None])
    # a rank alone on its head sends lse = 0 and gets exp(0 - 0) = 1 exactly; the weight must
    # still feed its output, or MLX's lazy graph would skip the collective on this rank
    mine = every[shard.seq_first_rank:shard.seq_first_rank + shard.seq_sharers]
    return mx.exp(lse - mx.logsumexp(mine, axis=0))


def sequence_sharded_attention(queries: mx.array, keys: mx.array, values: mx.array, cache, scale: float,
                               shard: RankShard, comm: Comm, mask=None) -> mx.array:
    """This rank's weighted part of the attention output (B, Hq, L, D), for a plan where some KV
    head is sequence-sharded. `keys`/`values` are the new positions (already rotated); every
    rank issues the same one all_gather per layer, sharer or not. `mask` is the model's, for a
    rank alone on its head (a batch cache's left padding)."""
    L = queries.shape[2]
    keys, values = cache.update_and_fetch(keys, values)
    if shard.seq_sharers == 1:  # whole head here: plain causal attention, but join the gather
        from mlx_lm.models.base import scaled_dot_product_attention

        out = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)
        w = merge_weights(mx.zeros(out.shape[:3], mx.float32), shard, comm)
        return out * w[..., None].astype(out.dtype)
    # the cache says which stored positions each query sees (prefill chunks, verify steps, batch rows)
    out, lse = partial_attention(queries, keys, values, scale, cache.quantization, *cache.attention_positions(L))
    w = merge_weights(lse, shard, comm)
    return out * w[..., None].astype(out.dtype)
