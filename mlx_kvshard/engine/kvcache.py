"""One rank's KV cache: its own heads only, in full precision or quantized, whole or (when
ranks share a KV head by sequence) every s-th position. mlx-lm's KVCache and
QuantizedKVCache do the storing; this file decides which one and keeps the positions.

Byte accounting matches `ShardPlan.kv_bytes_per_token` (per position held) times the
positions allocated (mlx-lm caches grow 256 positions at a time).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache

from ..plan import RankShard
from ..settings import KVSettings


def make_cache(shard: RankShard, kv: KVSettings, n_layers: int) -> list:
    """One cache per layer for this rank's KV heads."""
    return [_layer_cache(shard, kv) for _ in range(n_layers)]


def _layer_cache(shard: RankShard, kv: KVSettings):
    if kv.bits is None:
        inner = KVCache()
    elif kv.quant_start > 0:
        inner = LateQuantizedKVCache(kv.quant_start, kv.group_size, kv.bits)
    else:
        inner = QuantizedKVCache(group_size=kv.group_size, bits=kv.bits)
    if shard.seq_sharers > 1:
        return SequenceShardedKVCache(shard.seq_sharers, shard.seq_index, inner)
    return inner


class LateQuantizedKVCache(_BaseCache):
    """Full precision until it holds `start` tokens, then mlx-lm's QuantizedKVCache, converted
    as mlx-lm's `quantized_kv_start` converts (every stored position at once, before the
    next update). Attributes not defined here (bits, group_size, make_mask, ...) are the
    current cache's, so mlx-lm's scaled_dot_product_attention picks the quantized kernel
    exactly when the cache is quantized."""

    def __init__(self, start: int, group_size: int = 64, bits: int = 8):
        self.start, self._group_size, self._bits = start, group_size, bits
        self.cache = KVCache()

    def __getattr__(self, name):
        if name == "cache":  # not set yet (unpickling, from_state): no recursion
            raise AttributeError(name)
        return getattr(self.cache, name)

    def update_and_fetch(self, keys, values):
        if isinstance(self.cache, KVCache) and self.cache.offset >= self.start:
            self.cache = self.cache.to_quantized(group_size=self._group_size, bits=self._bits)
        return self.cache.update_and_fetch(keys, values)

    @property
    def offset(self) -> int:
        return self.cache.offset

    @property
    def state(self):
        return self.cache.state

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def empty(self) -> bool:
        return self.cache.empty()


class SequenceShardedKVCache(_BaseCache):
    """This rank's share of a KV head shared by `sharers` ranks: positions p with
    p % sharers == index, stored in `inner` (any mlx-lm-style cache) in order. `offset` counts
    every position of the sequence (RoPE and the causal mask need absolute positions)."""

    def __init__(self, sharers: int, index: int, inner):
        self.sharers, self.index, self.inner = sharers, index, inner
        self.offset = 0
        self._last = None  # the last update's keys, all positions: see `state`

    def update_and_fetch(self, keys, values):
        """Store the new positions this rank owns; return every stored (keys, values), or
        (None, None) while it owns none yet."""
        first = (self.index - self.offset) % self.sharers
        self.offset += keys.shape[2]
        self._last = keys
        if first < keys.shape[2]:
            self.inner.update_and_fetch(keys[:, :, first::self.sharers], values[:, :, first::self.sharers])
        if self.inner.empty():
            return None, None
        return self.inner.keys_and_values()

    def positions(self) -> mx.array:
        """Absolute position of every stored entry."""
        return mx.arange(self.inner.offset) * self.sharers + self.index

    @property
    def quantization(self) -> tuple[int, int] | None:
        """(group_size, bits) while the stored entries are quantized."""
        return (self.inner.group_size, self.inner.bits) if hasattr(self.inner, "bits") else None

    def make_mask(self, N: int, **kwargs):
        return "causal" if N > 1 else None  # unused: sequence attention masks by absolute position

    @property
    def state(self):
        # Evaluating the state must run the same collectives on every rank (prefill evaluates
        # only the caches): a chunk may bring this rank no position of its own, so the state
        # also holds the chunk's keys, which depend on every earlier layer as a sharer's do.
        last = [] if self._last is None else [self._last]
        return last if self.inner.empty() else [*self.inner.state, *last]

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def empty(self) -> bool:
        return self.inner.empty()


def stored_positions(cache) -> int:
    """Positions this layer cache holds (a share of them, when sequence-sharded)."""
    return cache.inner.offset if isinstance(cache, SequenceShardedKVCache) else cache.offset


def allocated_positions(cache) -> int:
    """Positions this layer cache has room for (its nbytes = this x bytes per position)."""
    while isinstance(cache, (SequenceShardedKVCache, LateQuantizedKVCache)):
        cache = cache.inner if isinstance(cache, SequenceShardedKVCache) else cache.cache
    if cache.empty():
        return 0
    keys = cache.keys[0] if isinstance(cache.keys, (tuple, list)) else cache.keys  # quantized: a triple
    return keys.shape[2]
