"""Quantized KV with a full-precision recent window (--kv-fp-window W; KIVI's residual).

Each row's most recent W positions stay in the compute dtype; older ones are quantized
(mlx.quantize, like mlx-lm's QuantizedKVCache). Measured on real text (docs/kv-quality.md),
the window is where 4-bit loses most: a decode step attends hardest to its last few
positions. Every query sees the W positions up to its own in full precision and older ones
quantized, in a prefill chunk as in a decode step, so the chunking changes nothing; after
each update the positions older than the newest one's window are stored quantized.

One class serves one sequence (generate, perplexity, a prompt's prefill) and the serving
engine's left-padded batch: every row's newest position is the batch's last column, so the
last W columns are every row's window. Columns [0, nq) are stored quantized, [nq, idx) in
full precision; attention runs over both (scores concatenated, one softmax) with one mask
for causality and left padding. Per head and position: world N holds world 1's values.

merge/extend/filter/extract place rows at new columns; a position landing on the other
side of the boundary than it was stored is converted (quantized, or dequantized: only a
prefix-cache hit whose blocks were saved quantized does that, see `join`).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

Triple = list  # [packed uint32, scales, biases], each (B, H, columns, ...)


class WindowQuantizedKVCache(_BaseCache):
    step = 256  # quantized columns are allocated this many at a time (as mlx-lm's caches)

    def __init__(self, window: int, group_size: int, bits: int, left_padding: list[int] | None = None):
        """One sequence (`left_padding` None: `offset` is an int) or a left-padded batch."""
        self.window, self.q_group_size, self.q_bits = window, group_size, bits
        self.batched = left_padding is not None
        self.left_padding = mx.array(left_padding if self.batched else [0])
        self.qk: Triple | None = None  # quantized columns [0, nq) (allocated further)
        self.qv: Triple | None = None
        self.nq = 0
        self.fk: mx.array | None = None  # full-precision columns [nq, idx)
        self.fv: mx.array | None = None
        self._idx = 0

    # ---- shape ------------------------------------------------------------------------

    @property
    def nf(self) -> int:
        return self._idx - self.nq

    @property
    def rows(self) -> int:
        return self.left_padding.shape[0]

    @property
    def offset(self):
        return self._idx - self.left_padding if self.batched else self._idx

    def empty(self) -> bool:
        return self._idx == 0

    def _like(self, left_padding=None) -> "WindowQuantizedKVCache":
        return WindowQuantizedKVCache(self.window, self.q_group_size, self.q_bits, left_padding)

    # ---- storing ----------------------------------------------------------------------

    def _quantize(self, x: mx.array) -> Triple:
        return list(mx.quantize(x, group_size=self.q_group_size, bits=self.q_bits))

    def _dequantize(self, t: Triple) -> mx.array:
        return mx.dequantize(*t, group_size=self.q_group_size, bits=self.q_bits)

    def _append_quantized(self, new: list[Triple]) -> None:
        """Append quantized columns ([K triple, V triple]) after the stored ones."""
        n = new[0][0].shape[2]
        if self.qk is None or self.nq + n > self.qk[0].shape[2]:
            room = (self.nq + n + self.step - 1) // self.step * self.step
            grown = []
            for old, fresh in zip((self.qk, self.qv), new):
                arrays = []
                for i, x in enumerate(fresh):
                    buf = mx.zeros((*x.shape[:2], room, x.shape[3]), x.dtype)
                    if old is not None and self.nq:
                        buf[..., :self.nq, :] = old[i][..., :self.nq, :]
                    arrays.append(buf)
                grown.append(arrays)
            self.qk, self.qv = grown
        for store, fresh in zip((self.qk, self.qv), new):
            for x, y in zip(store, fresh):
                x[..., self.nq:self.nq + n, :] = y
        self.nq += n

    def update_and_fetch(self, keys, values):
        raise TypeError("WindowQuantizedKVCache is read through attend (two stores), not update_and_fetch")

    # ---- attention --------------------------------------------------------------------

    def make_mask(self, N: int, **kwargs):
        return None  # `attend` masks causality and padding itself

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """Store the new positions, then attention of `queries` (B, Hq, L, D) over every stored
        one, each query seeing the W positions up to and including its own in full precision
        and older ones quantized, as it would decoding one token at a time: a prefill chunk
        (or a perplexity window) attends exactly as generation does, whatever the chunking."""
        B, n_q, L, D = queries.shape
        n_kv = keys.shape[1]
        fk = keys if self.nf == 0 else mx.concatenate([self.fk, keys], axis=2)  # the full-precision columns
        fv = values if self.nf == 0 else mx.concatenate([self.fv, values], axis=2)
        first = self.nq  # fk's first column
        self._idx += L
        m = max(0, self._idx - self.window - first)  # fk's columns leaving the window now (older than any query's)
        leaving = [self._quantize(fk[..., :m, :]), self._quantize(fv[..., :m, :])] if m else None
        pos = self._idx - L + mx.arange(L)  # the new queries' columns
        q = (queries * scale).reshape(B, n_kv, n_q // n_kv, L, D)
        scores = q @ mx.expand_dims(fk, 2).swapaxes(-1, -2)  # (B, n_kv, rep, L, fk columns)
        if m:  # a leaving column is quantized for a query more than W positions after it
            in_window = (first + mx.arange(m))[None, :] > (pos - self.window)[:, None]  # (L, m)
            lk = [mx.expand_dims(x, 2) for x in leaving[0]]
            s_q = mx.quantized_matmul(q, *lk, transpose=True, group_size=self.q_group_size, bits=self.q_bits)
            scores = mx.concatenate([mx.where(in_window, scores[..., :m], s_q), scores[..., m:]], axis=-1)
        if self.nq:  # stored quantized columns: older than the window for every query
            sk = [mx.expand_dims(x[..., :self.nq, :], 2) for x in self.qk]
            stored = mx.quantized_matmul(q, *sk, transpose=True, group_size=self.q_group_size, bits=self.q_bits)
            scores = mx.concatenate([stored, scores], axis=-1)
        mask = self._mask(pos)
        if mask is not None:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        p = mx.softmax(scores, axis=-1, precise=True)
        p_f = p[..., self.nq:]
        if m:
            p_f = mx.concatenate([mx.where(in_window, p_f[..., :m], 0.0), p_f[..., m:]], axis=-1)
        out = p_f @ mx.expand_dims(fv, 2)
        if m:
            lv = [mx.expand_dims(x, 2) for x in leaving[1]]
            out = out + mx.quantized_matmul(mx.where(in_window, 0.0, p[..., self.nq:self.nq + m]), *lv,
                                            transpose=False, group_size=self.q_group_size, bits=self.q_bits)
        if self.nq:
            sv = [mx.expand_dims(x[..., :self.nq, :], 2) for x in self.qv]
            out = out + mx.quantized_matmul(p[..., :self.nq], *sv, transpose=False, group_size=self.q_group_size,
                                            bits=self.q_bits)
        if m:
            self._append_quantized(leaving)
        self.fk, self.fv = fk[..., m:, :], fv[..., m:, :]
        return out.reshape(B, n_q, L, D)

    def _mask(self, pos: mx.array) -> mx.array | None:
        """(B or 1, 1, 1, L, idx): column c is visible to the query at column pos[l] of row b when
        c is at or before it and not left padding."""
        if pos.shape[0] == 1 and not self.batched:
            return None
        cols = mx.arange(self._idx)
        visible = cols[None, :] <= pos[:, None]  # (L, idx)
        if self.batched:
            visible = visible[None] & (cols[None, :] >= self.left_padding[:, None])[:, None, :]
        else:
            visible = visible[None]
        return visible[:, None, None]

    # ---- columns in either form -------------------------------------------------------

    def _quantized_columns(self, a: int, b: int, ref) -> tuple[Triple, Triple] | None:
        """Columns [a, b) quantized (columns < 0: zeros, padding), or None if empty."""
        if b <= a:
            return None
        parts_k, parts_v = [], []
        if a < 0:
            zk, zv = (self._quantize(mx.zeros((self.rows, ref[0], min(b, 0) - a, d), ref[3])) for d in ref[1:3])
            parts_k.append(zk)
            parts_v.append(zv)
        lo, hi = max(a, 0), min(b, self.nq)
        if hi > lo:
            parts_k.append([x[..., lo:hi, :] for x in self.qk])
            parts_v.append([x[..., lo:hi, :] for x in self.qv])
        lo, hi = max(a, self.nq), b
        if hi > lo:
            parts_k.append(self._quantize(self.fk[..., lo - self.nq:hi - self.nq, :]))
            parts_v.append(self._quantize(self.fv[..., lo - self.nq:hi - self.nq, :]))
        join = (lambda parts: [mx.concatenate(xs, axis=2) for xs in zip(*parts)])
        return join(parts_k), join(parts_v)

    def _fp_columns(self, a: int, b: int, ref) -> tuple[mx.array, mx.array] | None:
        """Columns [a, b) in full precision (columns < 0: zeros), or None if empty."""
        if b <= a:
            return None
        parts_k, parts_v = [], []
        if a < 0:
            parts_k.append(mx.zeros((self.rows, ref[0], min(b, 0) - a, ref[1]), ref[3]))
            parts_v.append(mx.zeros((self.rows, ref[0], min(b, 0) - a, ref[2]), ref[3]))
        lo, hi = max(a, 0), min(b, self.nq)
        if hi > lo:
            parts_k.append(self._dequantize([x[..., lo:hi, :] for x in self.qk]).astype(ref[3]))
            parts_v.append(self._dequantize([x[..., lo:hi, :] for x in self.qv]).astype(ref[3]))
        lo, hi = max(a, self.nq), b
        if hi > lo:
            parts_k.append(self.fk[..., lo - self.nq:hi - self.nq, :])
            parts_v.append(self.fv[..., lo - self.nq:hi - self.nq, :])
        return mx.concatenate(parts_k, axis=2), mx.concatenate(parts_v, axis=2)

    def _ref(self):
        """(kv heads, key dim, value dim, dtype) of what is stored."""
        if self.fk is not None:
            return self.fk.shape[1], self.fk.shape[3], self.fv.shape[3], self.fk.dtype
        if self.qk is None:
            return None
        d_k = self.qk[0].shape[3] * 32 // self.q_bits
        d_v = self.qv[0].shape[3] * 32 // self.q_bits
        return self.qk[0].shape[1], d_k, d_v, self.qk[1].dtype

    def _columns(self, shift: int, idx: int, ref) -> tuple:
        """This cache's columns moved right by `shift` (negative: cut from the left) into a
        cache of `idx` columns with the window rule's boundary: (quantized K, V, fp K, V)."""
        nq = max(0, idx - self.window)
        q = self._quantized_columns(-shift, nq - shift, ref)
        f = self._fp_columns(nq - shift, idx - shift, ref)
        return (*(q or (None, None)), *(f or (None, None)))

    def _set(self, idx: int, qk, qv, fk, fv) -> None:
        self._idx, self.nq = idx, max(0, idx - self.window)
        self.qk, self.qv, self.fk, self.fv = qk, qv, fk, fv

    # ---- what the engine does with a batch (serving/batch.py) -------------------------

    @classmethod
    def merge(cls, caches: list) -> "WindowQuantizedKVCache":
        """A left-padded batch from single-sequence caches."""
        ref = next((c._ref() for c in caches if c._ref() is not None), None)
        idx = max(c._idx for c in caches)
        batch = caches[0]._like([idx - c._idx for c in caches])
        if ref is None:
            return batch
        parts = [c._columns(idx - c._idx, idx, ref) for c in caches]
        batch._set(idx, *_concat(parts, 0))
        return batch

    def extend(self, other: "WindowQuantizedKVCache") -> None:
        ref = self._ref() or other._ref()
        idx = max(self._idx, other._idx)
        pads = [c.left_padding + (idx - c._idx) for c in (self, other)]
        if ref is not None:
            self._set(idx, *_concat([c._columns(idx - c._idx, idx, ref) for c in (self, other)], 0))
        self.left_padding = mx.concatenate(pads)

    def filter(self, batch_indices) -> None:
        """Keep the given rows, then cut the left padding all of them have."""
        pick = lambda x: None if x is None else x[batch_indices]  # noqa: E731
        self.qk = None if self.qk is None else [pick(x) for x in self.qk]
        self.qv = None if self.qv is None else [pick(x) for x in self.qv]
        self.fk, self.fv = pick(self.fk), pick(self.fv)
        self.left_padding = self.left_padding[batch_indices]
        cut = min(self.left_padding.tolist())
        if cut > 0 and self._ref() is not None:
            self._set(self._idx - cut, *self._columns(-cut, self._idx - cut, self._ref()))
            self.left_padding = self.left_padding - cut

    def extract(self, idx: int) -> "WindowQuantizedKVCache":
        """Row `idx` alone, as a single-sequence cache."""
        row = self._like([0])
        pick = lambda x: None if x is None else x[idx:idx + 1]  # noqa: E731
        row.qk = None if self.qk is None else [pick(x) for x in self.qk]
        row.qv = None if self.qv is None else [pick(x) for x in self.qv]
        row.fk, row.fv, row.nq, row._idx = pick(self.fk), pick(self.fv), self.nq, self._idx
        pad = self.left_padding.tolist()[idx]
        out = self._like()
        if row._ref() is not None:
            out._set(self._idx - pad, *row._columns(-pad, self._idx - pad, row._ref()))
        return out

    # ---- prefix-cache blocks (kv/store.py) ---------------------------------------------

    def slice_copy(self, start: int, end: int) -> "WindowQuantizedKVCache":
        """Positions [start, end) of one sequence, each in the form it has now: a block whose
        first columns are quantized and the rest full precision."""
        out = self._like()
        nq = min(max(self.nq - start, 0), end - start)
        q = self._quantized_columns(start, start + nq, self._ref())
        f = self._fp_columns(start + nq, end, self._ref())
        out.fk, out.fv = f if f else (None, None)
        out.qk, out.qv = (None, None) if q is None else ([mx.contiguous(x) for x in q[0]],
                                                          [mx.contiguous(x) for x in q[1]])
        out.nq, out._idx = nq, end - start
        return out

    @classmethod
    def join(cls, blocks: list, n: int) -> "WindowQuantizedKVCache":
        """The first n positions of `blocks` one after the other, with the window rule's
        boundary: a block's full-precision positions older than the window are quantized, and
        quantized ones inside it (a block saved after they left its source's window) are
        dequantized: a hit then holds them as quantized values, not the originals."""
        out = blocks[0]._like()
        ref = blocks[0]._ref()
        nq = max(0, n - out.window)
        parts, at = [], 0
        for b in blocks:
            take = min(b._idx, n - at)
            if take <= 0:
                break
            # this block's columns [0, take) sit at out's [at, at + take)
            q = b._quantized_columns(0, min(take, max(nq - at, 0)), ref)
            f = b._fp_columns(min(take, max(nq - at, 0)), take, ref)
            parts.append((*(q or (None, None)), *(f or (None, None))))
            at += take
        out._set(at, *_concat(parts, 2))
        return out

    # ---- facts ------------------------------------------------------------------------

    @property
    def state(self):
        return [x for x in [*(self.qk or []), *(self.qv or []), self.fk, self.fv, self.left_padding]
                if x is not None]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.state if x is not self.left_padding)

    def allocated_positions(self) -> int:
        return (self.qk[0].shape[2] if self.qk is not None else 0) + self.nf

    def is_trimmable(self) -> bool:
        return False  # speculative decoding is refused with a window (generate) or not used (engine)

    def trim(self, n: int) -> int:
        raise TypeError("WindowQuantizedKVCache cannot trim")


def _concat(parts: list[tuple], axis: int) -> tuple:
    """Parts, each (quantized K, V, fp K, V) with None for an empty one, joined along `axis`:
    0 stacks rows of caches with the same columns, 2 puts a sequence's blocks one after the other."""
    out = []
    for i in range(4):
        xs = [p[i] for p in parts if p[i] is not None]
        if not xs:
            out.append(None)
        elif isinstance(xs[0], list):
            out.append([mx.concatenate(col, axis=axis) for col in zip(*xs)])
        else:
            out.append(mx.concatenate(xs, axis=axis))
    return tuple(out)
