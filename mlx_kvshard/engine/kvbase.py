"""The KV cache classes of one rank: its own heads only, in full precision or quantized,
whole or (when ranks share a KV head by sequence) every s-th position; late quantization;
the batched quantized cache the serving engine needs. mlx-lm's KVCache, QuantizedKVCache
and BatchKVCache do the storing. Which class a rank uses is decided in kvcache.py, which
also dispatches copies to the special forms (seqkv.py, kvwindow.py); this module sits
below those forms so they can build on it without an import cycle.

Byte accounting matches `ShardPlan.kv_bytes_per_token` (per position held) times the
positions allocated (mlx-lm caches grow 256 positions at a time).
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, _BaseCache, dynamic_roll

from ..plan import RankShard


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

    def is_trimmable(self) -> bool:  # _BaseCache says False; the current cache decides
        return self.cache.is_trimmable()

    def trim(self, n: int) -> int:
        return self.cache.trim(n)


class SequenceShardedKVCache(_BaseCache):
    """This rank's share of a KV head shared by `shard.seq_sharers` ranks: the positions the
    shard's ownership cycle gives it (plan.py), stored in `inner` (any mlx-lm-style cache) in
    order. `offset` counts every position of the sequence (RoPE and the causal mask need
    absolute positions)."""

    def __init__(self, shard: RankShard, inner):
        self.shard, self.inner = shard, inner
        self.sharers, self.index = shard.seq_sharers, shard.seq_index
        self.offset = 0
        self._last = None  # the last update's keys, all positions: see `state`

    def update_and_fetch(self, keys, values):
        """Store the new positions this rank owns; return every stored (keys, values), or
        (None, None) while it owns none yet."""
        L = keys.shape[2]
        if len(self.shard.seq_cycle) == self.sharers:  # even shares: every s-th position
            first = (self.index - self.offset) % self.sharers
            mine = slice(first, None, self.sharers) if first < L else None
        else:
            owned = [i for i in range(L) if self.shard.seq_owns(self.offset + i)]
            mine = mx.array(owned) if owned else None
        self.offset += L
        self._last = keys
        if mine is not None:
            self.inner.update_and_fetch(keys[:, :, mine], values[:, :, mine])
        if self.inner.empty():
            return None, None
        return self.inner.keys_and_values()

    def positions(self) -> mx.array:
        """Absolute position of every stored entry."""
        return held_positions(self.shard, self.inner.offset)

    def attention_positions(self, L: int) -> tuple:
        """(query positions, key positions) masking the last update's L queries by absolute
        position; () for one decode query, which sees every stored position."""
        return (mx.arange(self.offset - L, self.offset), self.positions()) if L > 1 else ()

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

    def is_trimmable(self) -> bool:
        return self.inner.is_trimmable()

    def trim(self, n: int) -> int:
        """Drop the sequence's last n positions (speculative decoding's rejected drafts): this
        rank removes those of them it holds."""
        n = min(n, self.offset)
        start = self.offset - n
        mine = self.shard.seq_held(self.offset) - self.shard.seq_held(start)
        if mine:
            self.inner.trim(mine)
        self.offset = start
        return n


def held_positions(shard: RankShard, n: int) -> mx.array:
    """Absolute positions of the first n positions `shard` holds of a sequence (its cycle's
    slots, repeated every cycle)."""
    slots, period = shard.seq_slots, len(shard.seq_cycle)
    j = mx.arange(n)
    if len(slots) == 1:
        return j * period + slots[0]
    return j // len(slots) * period + mx.array(slots)[j % len(slots)]


def stored_positions(cache) -> int:
    """Positions this layer cache holds (a share of them, when sequence-sharded)."""
    return cache.inner.offset if isinstance(cache, SequenceShardedKVCache) else cache.offset


def allocated_positions(cache) -> int:
    """Positions this layer cache has room for (its nbytes = this x bytes per position)."""
    if hasattr(cache, "allocated_positions"):  # a batch of two forms (engine/kvlate.py)
        return cache.allocated_positions()
    while isinstance(cache, (SequenceShardedKVCache, LateQuantizedKVCache)):
        cache = cache.inner if isinstance(cache, SequenceShardedKVCache) else cache.cache
    if cache.empty():
        return 0
    keys = cache.keys[0] if isinstance(cache.keys, (tuple, list)) else cache.keys  # quantized: a triple
    return keys.shape[2]


class BatchQuantizedKVCache(BatchKVCache):
    """mlx-lm's BatchKVCache (left-padded batch; prepare/finalize, make_mask, filter, extend,
    extract, merge) storing K and V quantized like its QuantizedKVCache: each is a list of
    (packed uint32, scales, biases) arrays of shape (B, heads, positions, ...). `bits` and
    `group_size` make mlx-lm's scaled_dot_product_attention take the quantized kernel.
    mlx-lm has no batched quantized cache; the serving engine needs one."""

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8):
        super().__init__(left_padding)
        self.group_size, self.bits = group_size, bits

    def _zeros(self, B: int, H: int, n: int, dim: int, dtype) -> list[mx.array]:
        groups = (B, H, n, dim // self.group_size)
        return [mx.zeros((B, H, n, dim * self.bits // 32), mx.uint32), mx.zeros(groups, dtype),
                mx.zeros(groups, dtype)]

    def update_and_fetch(self, keys, values):
        B, H, L, k_dim = keys.shape
        prev = self._idx
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            n = (self.step + L - 1) // self.step * self.step
            new_k, new_v = self._zeros(B, H, n, k_dim, keys.dtype), self._zeros(B, H, n, values.shape[3], keys.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys, self.values = ([mx.concatenate([x[..., :prev, :], y], axis=2) for x, y in zip(old, new)]
                                          for old, new in ((self.keys, new_k), (self.values, new_v)))
        self.offset = self.offset + L
        self._idx += L
        for store, new in ((self.keys, keys), (self.values, values)):
            for x, q in zip(store, mx.quantize(new, group_size=self.group_size, bits=self.bits)):
                x[..., prev:self._idx, :] = q
        return self.keys_and_values()

    def _map(self, fn) -> None:
        """Apply `fn` to every stored array (packed values, scales, biases of K and V)."""
        if self.keys is not None:
            self.keys, self.values = [fn(x) for x in self.keys], [fn(x) for x in self.values]

    def keys_and_values(self):
        return [x[..., :self._idx, :] for x in self.keys], [x[..., :self._idx, :] for x in self.values]

    def finalize(self):
        if self._right_padding is not None:
            padding = self._right_padding
            self._map(lambda x: dynamic_roll(x, padding[:, None], axis=2))
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    def filter(self, batch_indices):
        """Keep the given sequences (in place), then drop padding every one of them has."""
        self._map(lambda x: x[batch_indices])
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        min_left_pad = min(self.left_padding.tolist())
        if min_left_pad > 0:
            self._map(lambda x: x[..., min_left_pad:, :])
            self._idx -= min_left_pad
            self.left_padding -= min_left_pad

    def extend(self, other: "BatchQuantizedKVCache"):
        """Append `other`'s sequences (in place), right-aligning both at the longer index."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        max_idx = max(self._idx, other._idx)
        ref = self if self.keys is not None else other
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c):
            if c.keys is None:
                rows = c.offset.shape[0]
                k, v = ([mx.zeros((rows, *x.shape[1:2], 0, x.shape[3]), x.dtype) for x in store]
                        for store in (ref.keys, ref.values))
            else:
                k, v = c.keys, c.values
            left = max_idx - c._idx
            right = size - k[0].shape[2] - left
            k, v = ([_pad_positions(x, left, right) for x in store] for store in (k, v))
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = pad(self), pad(other)
        self.keys = [mx.concatenate([a, b]) for a, b in zip(k1, k2)]
        self.values = [mx.concatenate([a, b]) for a, b in zip(v1, v2)]
        self.offset, self.left_padding = mx.concatenate([o1, o2]), mx.concatenate([p1, p2])
        self._idx = max_idx

    def extract(self, idx: int) -> QuantizedKVCache:
        """Sequence `idx` alone, as mlx-lm's single-stream QuantizedKVCache."""
        cache = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        padding = self.left_padding.tolist()[idx]
        cache.keys, cache.values = ([mx.contiguous(x[idx:idx + 1, :, padding:self._idx]) for x in store]
                                    for store in (self.keys, self.values))
        cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches: list) -> "BatchQuantizedKVCache":
        """A batch from single-stream QuantizedKVCaches (all with the same bits and group size),
        left-padded to the longest."""
        lengths = [c.offset for c in caches]
        ref = next((c for c in caches if c.keys is not None), caches[0])
        batch = cls([max(lengths) - n for n in lengths], group_size=ref.group_size, bits=ref.bits)
        if max(lengths) == 0:
            return batch
        n = max(lengths)
        batch.keys, batch.values = ([mx.zeros((len(caches), x.shape[1], n, x.shape[3]), x.dtype) for x in store]
                                    for store in (ref.keys, ref.values))
        for i, c in enumerate(caches):
            if c.offset:
                for dst, src in zip([*batch.keys, *batch.values], [*c.keys, *c.values]):
                    dst[i:i + 1, :, n - c.offset:] = src[..., :c.offset, :]
        batch.offset = batch.offset + n
        batch._idx = n
        return batch

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(x.nbytes for x in [*self.keys, *self.values])


def _pad_positions(x: mx.array, left: int, right: int) -> mx.array:
    if right < 0:
        x, right = x[..., :right, :], 0
    return mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]) if left or right else x


def _empty_like(cache):
    if isinstance(cache, QuantizedKVCache):
        return QuantizedKVCache(group_size=cache.group_size, bits=cache.bits)
    if type(cache) is KVCache:
        return KVCache()
    raise TypeError(f"no prefix copy of a {type(cache).__name__}")


def slice_plain(cache, start: int, end: int):
    """slice_copy (kvcache.py) for a whole-sequence cache: full precision, quantized or late."""
    if isinstance(cache, LateQuantizedKVCache):
        cache = cache.cache  # the block keeps the form the positions are in now
    out = _empty_like(cache)
    out.keys, out.values = tree_map(lambda x: mx.contiguous(x[..., start:end, :]), (cache.keys, cache.values))
    out.offset = end - start
    return out


def join_plain(caches: list, n: int):
    """joined_copy (kvcache.py) for whole-sequence caches. Under late quantization a chain
    may hold blocks saved before and after their row was quantized: then all are."""
    quantized = next((c for c in caches if isinstance(c, QuantizedKVCache)), None)
    if quantized is not None:
        caches = [c if isinstance(c, QuantizedKVCache) else c.to_quantized(quantized.group_size, quantized.bits)
                  for c in caches]
    out = _empty_like(caches[0])
    parts = [tree_map(lambda x: x[..., :c.offset, :], (c.keys, c.values)) for c in caches]
    joined = tree_map(lambda *xs: mx.concatenate(xs, axis=2)[..., :n, :], *parts)
    out.keys, out.values = joined
    out.offset = n
    return out
