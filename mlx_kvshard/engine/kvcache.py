"""Which KV cache one rank uses, from its shard and KV settings (make_cache for one
sequence, batch_cache_class / make_batch_cache for the serving engine's batch), and copies
of prefix-cache blocks dispatched to each cache form. The classes themselves live in
kvbase.py (the common forms), seqkv.py (a sequence-sharded batch), kvlate.py (late
quantization in a batch) and kvwindow.py (4-bit with a full-precision window); they are
re-exported here for callers.
"""

from __future__ import annotations

from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache

from ..plan import RankShard
from ..settings import KVSettings
from .kvbase import (BatchQuantizedKVCache, LateQuantizedKVCache, SequenceShardedKVCache,  # noqa: F401 (re-exported)
                     allocated_positions, held_positions, join_plain, slice_plain, stored_positions)


def make_cache(shard: RankShard, kv: KVSettings, n_layers: int) -> list:
    """One cache per layer for this rank's KV heads."""
    return [_layer_cache(shard, kv) for _ in range(n_layers)]


def _layer_cache(shard: RankShard, kv: KVSettings):
    if kv.bits is None:
        inner = KVCache()
    elif kv.window:
        from .kvwindow import WindowQuantizedKVCache

        return WindowQuantizedKVCache(kv.window, kv.group_size, kv.bits)  # never sequence-sharded (ShardPlan)
    elif kv.quant_start > 0:
        inner = LateQuantizedKVCache(kv.quant_start, kv.group_size, kv.bits)
    else:
        inner = QuantizedKVCache(group_size=kv.group_size, bits=kv.bits)
    if shard.seq_sharers > 1:
        return SequenceShardedKVCache(shard, inner)
    return inner


def batch_cache_class(shard: RankShard, kv: KVSettings) -> type:
    """The batched cache for this rank's heads: mlx-lm's BatchKVCache, or the quantized one
    above (both build a batch with `merge` of single-stream rows from `make_cache`), for a
    sequence-sharded head seqkv.py's BatchSequenceKVCache, with --kv-quant-start kvlate.py's
    batch of full-precision and quantized rows."""
    if shard.seq_sharers > 1:
        from .seqkv import BatchSequenceKVCache

        return BatchSequenceKVCache
    if kv.window:
        from .kvwindow import WindowQuantizedKVCache

        return WindowQuantizedKVCache
    if kv.late:
        from .kvlate import BatchLateQuantizedKVCache

        return BatchLateQuantizedKVCache
    return BatchKVCache if kv.bits is None else BatchQuantizedKVCache


def make_batch_cache(shard: RankShard, kv: KVSettings, n_layers: int, left_padding: list[int]) -> list:
    """Per layer, an empty batched cache for this rank's heads (see batch_cache_class)."""
    assert shard.seq_sharers == 1, "a sequence-sharded batch is built by merging prefilled rows"
    kind = batch_cache_class(shard, kv)
    if kind is BatchKVCache:
        return [BatchKVCache(left_padding) for _ in range(n_layers)]
    if kind is not BatchQuantizedKVCache:
        raise TypeError(f"no empty {kind.__name__}: it is built by merge")
    return [BatchQuantizedKVCache(left_padding, kv.group_size, kv.bits) for _ in range(n_layers)]


def slice_copy(cache, start: int, end: int):
    """A new single-stream cache of the same kind holding copies of positions [start, end)
    (a prefix-cache block)."""
    if isinstance(cache, SequenceShardedKVCache):
        from .seqkv import slice_sequence_copy

        return slice_sequence_copy(cache, start, end)
    if hasattr(cache, "slice_copy"):  # a full-precision window (engine/kvwindow.py)
        return cache.slice_copy(start, end)
    return slice_plain(cache, start, end)


def joined_copy(caches: list, n: int):
    """A new single-stream cache holding the first n positions of `caches` one after the
    other (a prompt starting from a chain of prefix-cache blocks)."""
    if isinstance(caches[0], SequenceShardedKVCache):
        from .seqkv import joined_sequence_copy

        return joined_sequence_copy(caches, n)
    if hasattr(caches[0], "join"):  # a full-precision window (engine/kvwindow.py)
        return type(caches[0]).join(caches, n)
    return join_plain(caches, n)
