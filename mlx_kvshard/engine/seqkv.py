"""The serving engine's batch of sequence-sharded KV: every row keeps this rank's share of
its sequence's positions (ownership by the row's own token index, plan.py's cycle), and
prefix-cache blocks of single-stream sequence-sharded caches.

Rows are not left-padded here. Row r stores the j-th position it holds at column j
(left-aligned), so the absolute position of column j is the same for every row
(`held_positions`); a row's columns past what it holds are stale or zero and are masked
by position, because the first position a row does not hold yet is at or after its
length, past every query. A decode step writes each row's new position at that row's
next free column (one scatter per K/V array); a row that does not own its new position
gets it written at its next free column anyway, unused and overwritten by the next one it
owns. Bookkeeping (each row's length and count held) is host-side Python: every rank runs
the same steps, so no step waits on the device to know a shape.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache

from ..plan import RankShard
from .kvbase import SequenceShardedKVCache, held_positions, join_plain, slice_plain


class BatchSequenceKVCache(_BaseCache):
    """Per layer, every batch row's share of this rank's sequence-sharded KV head, in full
    precision or quantized as mlx-lm's QuantizedKVCache stores it. Built by `merge` of
    prefilled single-stream SequenceShardedKVCaches; `extend`, `filter`, `extract` and
    `trim` as BatchState uses mlx-lm's BatchKVCache."""

    step = 256

    def __init__(self, shard: RankShard, group_size: int = 64, bits: int | None = None):
        self.shard, self.group_size, self.bits = shard, group_size, bits
        self.keys: list[mx.array] | None = None  # [K] or quantized [packed, scales, biases], each (B, H, N, ...)
        self.values: list[mx.array] | None = None
        self.tokens: list[int] = []  # per row: its sequence's length (its RoPE offset)
        self.held: list[int] = []  # per row: positions this rank holds (columns 0 .. held-1)

    # ---- the forward -------------------------------------------------------------------

    @property
    def offset(self) -> mx.array:
        return mx.array(self.tokens)

    @property
    def quantization(self) -> tuple[int, int] | None:
        return (self.group_size, self.bits) if self.bits else None

    def _columns(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def _grow(self, need: int, like: list[mx.array], like_v: list[mx.array]) -> None:
        """Room for `need` columns in every row (zeros on the right, `step` at a time)."""
        have = self._columns()
        if need <= have:
            return
        n = (need + self.step - 1) // self.step * self.step - have
        B = len(self.tokens)

        def zeros(x):
            return mx.zeros((B, x.shape[1], n, x.shape[3]), x.dtype)

        if self.keys is None:
            self.keys, self.values = [zeros(x) for x in like], [zeros(x) for x in like_v]
        else:
            self.keys = [mx.concatenate([x, zeros(x)], axis=2) for x in self.keys]
            self.values = [mx.concatenate([x, zeros(x)], axis=2) for x in self.values]

    def _store(self, x: mx.array) -> list[mx.array]:
        return list(mx.quantize(x, group_size=self.group_size, bits=self.bits)) if self.bits else [x]

    def update_and_fetch(self, keys, values):
        """Each row's L new positions (B, H, L, D) at its own token indices; returns every
        stored column (B, H, n, ...), masked by `attention_positions`."""
        L = keys.shape[2]
        new_k, new_v = self._store(keys), self._store(values)
        self._grow(max(self.held) + L, new_k, new_v)
        for i in range(L):
            cols = mx.array(self.held)[:, None, None, None]
            for store, new in ((self.keys, new_k), (self.values, new_v)):
                for j, (x, y) in enumerate(zip(store, new)):
                    index = mx.broadcast_to(cols, (*x.shape[:2], 1, x.shape[3]))
                    store[j] = mx.put_along_axis(x, index, y[:, :, i:i + 1], axis=2)
            for r, t in enumerate(self.tokens):
                self.held[r] += self.shard.seq_owns(t)
                self.tokens[r] = t + 1
        return self.keys_and_values()

    def keys_and_values(self):
        n = max(self.held, default=0)
        if n == 0:
            return None, None
        k, v = ([x[..., :n, :] for x in store] for store in (self.keys, self.values))
        return (k, v) if self.bits else (k[0], v[0])

    def attention_positions(self, L: int) -> tuple[mx.array, mx.array]:
        """(query positions (B, L), key positions (n,)) for the last update's L queries of
        every row: a row's stale columns are at positions past its queries."""
        q = mx.array([t - L for t in self.tokens])[:, None] + mx.arange(L)
        return q, held_positions(self.shard, max(self.held, default=0))

    def make_mask(self, N: int, **kwargs):
        return None  # unused: sequence attention masks by absolute position

    @property
    def state(self):
        return [] if self.keys is None else [*self.keys, *self.values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(x.nbytes for x in [*self.keys, *self.values])

    def empty(self) -> bool:
        return self.keys is None

    # ---- the batch ---------------------------------------------------------------------

    @classmethod
    def merge(cls, caches: list[SequenceShardedKVCache]) -> "BatchSequenceKVCache":
        """A batch of prefilled single-stream caches (their inner KVCache or QuantizedKVCache)."""
        inner = caches[0].inner
        bits = getattr(inner, "bits", None)
        batch = cls(caches[0].shard, getattr(inner, "group_size", 64), bits)
        batch.tokens = [c.offset for c in caches]
        batch.held = [c.inner.offset for c in caches]
        n = max(batch.held)
        if n == 0:
            return batch
        ref = next(c.inner for c in caches if c.inner.offset)
        parts = [list(ref.keys) if bits else [ref.keys], list(ref.values) if bits else [ref.values]]
        batch._grow(n, *parts)
        for r, c in enumerate(caches):
            if not c.inner.offset:
                continue
            ks, vs = (list(x) if bits else [x] for x in (c.inner.keys, c.inner.values))
            for store, src in ((batch.keys, ks), (batch.values, vs)):
                for dst, x in zip(store, src):
                    dst[r:r + 1, :, :c.inner.offset] = x[..., :c.inner.offset, :]
        return batch

    def extend(self, other: "BatchSequenceKVCache") -> None:
        """Append `other`'s rows (in place), both padded on the right to the wider."""
        if other.keys is not None or self.keys is not None:
            ref = other if other.keys is not None else self
            width = max(self._columns(), other._columns())
            for c in (self, other):
                rows = len(c.tokens)
                if c.keys is None:
                    c.keys = [mx.zeros((rows, x.shape[1], width, x.shape[3]), x.dtype) for x in ref.keys]
                    c.values = [mx.zeros((rows, x.shape[1], width, x.shape[3]), x.dtype) for x in ref.values]
                elif c._columns() < width:
                    pad = [(0, 0), (0, 0), (0, width - c._columns()), (0, 0)]
                    c.keys, c.values = [mx.pad(x, pad) for x in c.keys], [mx.pad(x, pad) for x in c.values]
            self.keys = [mx.concatenate([a, b]) for a, b in zip(self.keys, other.keys)]
            self.values = [mx.concatenate([a, b]) for a, b in zip(self.values, other.values)]
        self.tokens = self.tokens + other.tokens
        self.held = self.held + other.held

    def filter(self, batch_indices) -> None:
        """Keep the given rows (in place), and only the columns they use (to the next `step`)."""
        keep = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        self.tokens = [self.tokens[i] for i in keep]
        self.held = [self.held[i] for i in keep]
        if self.keys is None:
            return
        width = min(self._columns(), (max(self.held, default=0) + self.step - 1) // self.step * self.step)
        index = mx.array(keep)
        self.keys = [x[index][..., :width, :] for x in self.keys]
        self.values = [x[index][..., :width, :] for x in self.values]

    def extract(self, idx: int) -> SequenceShardedKVCache:
        """Row `idx` alone, as the single-stream cache it was prefilled into."""
        inner = QuantizedKVCache(group_size=self.group_size, bits=self.bits) if self.bits else KVCache()
        n = self.held[idx]
        if n:
            k, v = ([mx.contiguous(x[idx:idx + 1, :, :n]) for x in store] for store in (self.keys, self.values))
            inner.keys, inner.values = (k, v) if self.bits else (k[0], v[0])
            inner.offset = n
        out = SequenceShardedKVCache(self.shard, inner)
        out.offset = self.tokens[idx]
        return out

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop every row's last n positions (speculative decoding's rejected drafts)."""
        for r, t in enumerate(self.tokens):
            self.tokens[r] = max(0, t - n)
            self.held[r] = self.shard.seq_held(self.tokens[r])
        return n


def row_tokens(cache) -> list[int]:
    """Each batch row's sequence length, from a layer's batch cache of any kind."""
    if isinstance(cache, BatchSequenceKVCache):
        return list(cache.tokens)
    return (mx.array(cache._idx) - cache.left_padding).tolist()


def _empty_inner(inner):
    return QuantizedKVCache(group_size=inner.group_size, bits=inner.bits) if hasattr(inner, "bits") else KVCache()


def slice_sequence_copy(cache: SequenceShardedKVCache, start: int, end: int) -> SequenceShardedKVCache:
    """A prefix-cache block of positions [start, end): the ones of them this rank holds."""
    a, b = cache.shard.seq_held(start), cache.shard.seq_held(end)
    inner = slice_plain(cache.inner, a, b) if b > a else _empty_inner(cache.inner)
    out = SequenceShardedKVCache(cache.shard, inner)
    out.offset = end - start
    return out


def joined_sequence_copy(caches: list[SequenceShardedKVCache], n: int) -> SequenceShardedKVCache:
    """The first n positions of a chain of blocks: this rank's of them, in order."""
    held = caches[0].shard.seq_held(n)
    parts = [c.inner for c in caches if c.inner.offset]
    inner = join_plain(parts, held) if held else _empty_inner(caches[0].inner)
    out = SequenceShardedKVCache(caches[0].shard, inner)
    out.offset = n
    return out
