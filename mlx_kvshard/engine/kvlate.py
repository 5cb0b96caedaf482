"""Late KV quantization (--kv-quant-start T) in the batched engine, per row.

A row's cache stays in full precision until the row holds T tokens, then all of it is
quantized before its next update, exactly as the single-stream LateQuantizedKVCache (and
mlx-lm's `quantized_kv_start`) does. The rows of one batch are therefore in two forms at
once. Layout: two left-padded sub-batches per layer, mlx-lm's BatchKVCache for the rows
still in full precision and our BatchQuantizedKVCache for the others, under one cache that
the model sees as the batch. The forward stays one forward (one read of the weights, 2·L
all_sums for the whole batch); only attention splits, through `attend`: each sub-batch's
rows attend over their own store with their own padding mask, and the outputs go back in
batch order. A row moves to the quantized sub-batch once (extract, quantize, extend).

Why not one store: a left-padded batch shares its columns, and a row's form is per row, so
one store would have to hold every column in both forms (more bytes than full precision).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, _BaseCache

from .kvbase import BatchQuantizedKVCache, LateQuantizedKVCache

FP, QUANT = 0, 1  # which sub-batch a row is in


class BatchLateQuantizedKVCache(_BaseCache):
    """One layer's batch: `parts[FP]` (BatchKVCache) and `parts[QUANT]` (BatchQuantizedKVCache),
    either None while it holds no row. `form[j]` is row j's sub-batch; each sub-batch keeps
    its rows in batch order. `lengths[j]` is row j's tokens (its RoPE offset)."""

    def __init__(self, start: int, group_size: int, bits: int):
        self.start, self.q_group_size, self.q_bits = start, group_size, bits
        self.parts: list = [None, None]
        self.form: list[int] = []
        self.lengths: list[int] = []

    @classmethod
    def merge(cls, caches: list) -> "BatchLateQuantizedKVCache":
        """A batch from single-stream caches (LateQuantizedKVCache, or the plain KVCache /
        QuantizedKVCache it holds), each row in the form it is in."""
        ref = caches[0]
        if not isinstance(ref, LateQuantizedKVCache):
            raise TypeError(f"no late-quantized batch from a {type(ref).__name__}")
        batch = cls(ref.start, ref._group_size, ref._bits)
        inner = [c.cache if isinstance(c, LateQuantizedKVCache) else c for c in caches]
        batch.form = [QUANT if isinstance(c, QuantizedKVCache) else FP for c in inner]
        batch.lengths = [c.offset for c in inner]
        for form, kind in ((FP, BatchKVCache), (QUANT, BatchQuantizedKVCache)):
            rows = [c for c, f in zip(inner, batch.form) if f == form]
            if rows:
                batch.parts[form] = kind.merge(rows)
        return batch

    # ---- what the model reads --------------------------------------------------------

    @property
    def offset(self) -> mx.array:
        return mx.array(self.lengths)

    def make_mask(self, N: int, **kwargs):
        return None  # each sub-batch masks its own padding in `attend`

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """Store the new positions and attend, each sub-batch over its own store."""
        self._quantize_due()
        L = keys.shape[2]
        outs, order = [], []
        for form, part in enumerate(self.parts):
            rows = [j for j, f in enumerate(self.form) if f == form]
            if not rows:
                continue
            pick = (lambda x: x) if len(rows) == len(self.form) else (lambda x, i=mx.array(rows): x[i])
            mask = part.make_mask(L)  # before the update: it counts the columns already held
            k, v = part.update_and_fetch(pick(keys), pick(values))
            outs.append(scaled_dot_product_attention(pick(queries), k, v, cache=part, scale=scale, mask=mask))
            order += rows
        self.lengths = [n + L for n in self.lengths]
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        if order != sorted(order):
            back = sorted(range(len(order)), key=order.__getitem__)  # batch row j is out[back[j]]
            out = out[mx.array(back)]
        return out

    def _quantize_due(self) -> None:
        """Rows in full precision that hold `start` tokens move to the quantized sub-batch
        (every position quantized at once, before this update: LateQuantizedKVCache's rule)."""
        due = [j for j, (f, n) in enumerate(zip(self.form, self.lengths)) if f == FP and n >= self.start]
        if not due:
            return
        fp_rows = [j for j, f in enumerate(self.form) if f == FP]
        fp = self.parts[FP]
        moved = BatchQuantizedKVCache.merge([fp.extract(fp_rows.index(j)).to_quantized(self.q_group_size, self.q_bits)
                                             for j in due])
        keep = [i for i, j in enumerate(fp_rows) if j not in due]
        if keep:
            fp.filter(mx.array(keep))
        else:
            self.parts[FP] = None
        q_rows = [j for j, f in enumerate(self.form) if f == QUANT] + due  # the order they now sit in
        if self.parts[QUANT] is None:
            self.parts[QUANT] = moved
        else:
            self.parts[QUANT].extend(moved)
        for j in due:
            self.form[j] = QUANT
        if q_rows != sorted(q_rows):  # back to batch order
            self.parts[QUANT].filter(mx.array(sorted(range(len(q_rows)), key=q_rows.__getitem__)))

    # ---- what the engine does with a batch (serving/batch.py) -------------------------

    def _within(self, j: int) -> int:
        """Row j's index inside its sub-batch."""
        return sum(1 for f in self.form[:j] if f == self.form[j])

    def filter(self, batch_indices) -> None:
        keep = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        for form, part in enumerate(self.parts):
            sub = [self._within(j) for j in keep if self.form[j] == form]
            if not sub:
                self.parts[form] = None
            elif sub != list(range(len([f for f in self.form if f == form]))):
                part.filter(mx.array(sub))
        self.form = [self.form[j] for j in keep]
        self.lengths = [self.lengths[j] for j in keep]

    def extend(self, other: "BatchLateQuantizedKVCache") -> None:
        for form, part in enumerate(other.parts):
            if part is None:
                continue
            if self.parts[form] is None:
                self.parts[form] = part
            else:
                self.parts[form].extend(part)
        self.form += other.form
        self.lengths += other.lengths

    def extract(self, idx: int):
        """Row `idx` alone, as the plain single-stream cache of its form (a prefix-cache block's source)."""
        return self.parts[self.form[idx]].extract(self._within(idx))

    @property
    def state(self):
        return [p.state for p in self.parts if p is not None]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts if p is not None)

    def empty(self) -> bool:
        return not self.form

    def is_trimmable(self) -> bool:
        return all(p.is_trimmable() for p in self.parts if p is not None)

    def trim(self, n: int) -> int:
        """Speculation's rejected drafts (a batch of one row: one sub-batch)."""
        for p in self.parts:
            if p is not None:
                p.trim(n)
        self.lengths = [m - n for m in self.lengths]
        return n

    @property
    def _idx(self) -> int:  # the engine's report reads columns and padding as BatchKVCache's
        return max(self.lengths, default=0)

    @property
    def left_padding(self) -> mx.array:
        return mx.array([self._idx - n for n in self.lengths])

    def allocated_positions(self) -> int:
        """The larger sub-batch's allocated columns (rows x this is no byte count here: the
        two forms differ in bytes per position)."""
        return max(((p.keys[0] if isinstance(p.keys, list) else p.keys).shape[2]
                    for p in self.parts if p is not None and p.keys is not None), default=0)


def generate_quantizes_at(start: int, step: int, end: int, last: bool) -> int:
    """The position at which one-prompt generate quantizes a prompt's cache under
    --kv-quant-start `start`: its first cache update beginning at or after `start` tokens.
    generate prefills all but the last prompt token in chunks of `step` (updates begin at
    multiples of step), then the last token alone, then one token per step. Asked for an
    engine chunk ending at `end`: when `last`, the prompt has `end` tokens; otherwise more,
    and the answer only matters if it falls inside the chunk."""
    aligned = -(-start // step) * step  # the first prefill chunk beginning at or after start
    if not last:
        return aligned
    return min(aligned, end - 1) if start <= end - 1 else start


def adopt(cache, start: int, group_size: int, bits: int):
    """A plain single-stream cache (a prefix-cache hit's blocks) under late quantization:
    it quantizes at `start` tokens as a fresh one does (already quantized blocks stay so)."""
    late = LateQuantizedKVCache(start, group_size, bits)
    late.cache = cache if isinstance(cache, (KVCache, QuantizedKVCache)) else cache.cache
    return late
