"""The running batch's KV on one rank: which rows it holds, in which slots, in which layout,
and what admission reserves for that layout. serving/batch.py calls `RunningKV` (join,
remove, extract, trim, the decode order, facts) and the scheduler calls
`admission.admission_tokens` (pure Python, beside this module), so the layout and its
reservation are decided in this one room.

Layouts (`--kv-layout`, resolved by `resolve_layout`):

- **groups** (the default): rows in *length groups*. Each group is a left-padded sub-batch
  of the rank's batch cache class (mlx-lm's BatchKVCache, our quantized or 4-bit-window
  batch, or late quantization's two-form batch); a row joins the group whose columns pad
  it by at most its allowance (10% of its tokens, or 32 tokens if more: admission.py; every
  live row of the group stays within its own), else it starts a group. The forward stays one forward (weights read once, the same 2·L all_sums for the
  whole batch); only attention splits, one call per group. Columns grow by 1/GROW_SHARE of
  what a group holds (at least MIN_GROW), not mlx-lm's 256 at a time, so a short row holds
  about its own tokens. Memory and admission follow each row's own tokens: a long request
  beside short ones costs its own columns, not rows × the longest.
- **padded**: one left-padded batch for every row (rows × the longest row), as before.
  Pipeline stages (`--pp`, whose micro-batches slice one padded batch) and sequence-sharded
  KV (engine/seqkv.py, its own layout) use it.

Why groups and not per-row caches or a block pool: per-row attention is one attention call
per row per layer (16 rows: 16x the calls at equal lengths); a gathered block pool copies
every row's KV into a padded tensor each step (MLX has no paged-attention kernel). Groups
cost one call per distinct length class and at equal lengths are the padded batch itself.
docs/engine.md gives the measurements.

Row slots (holes). mlx-lm's `filter` and `extend` copy a whole (sub-)batch, so a finished
row's slot is kept as a hole while holes are few, and a joining prompt that fits a hole's
columns is written into it in place. Padded: holes are compacted by one `filter` once they
outnumber half the live rows or would hold the batch past the admitted capacity; groups:
once the hole rows' columns pass GROUP_SLACK of the live rows' tokens (they are memory no
request uses). Every rank runs this policy on the same messages, so every rank holds the
same slots.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache, KVCache, _BaseCache

from ..engine.kvcache import allocated_positions
from ..engine.seqkv import row_tokens
from .admission import GROUP_SLACK, pad_allowance

GROW_SHARE = 16  # a group's columns grow by 1/16 of what it holds...
MIN_GROW = 4  # ...and at least this many positions
PENDING_GROW = 16  # a prompt's own cache (before it joins) grows by this many
TRIM_COLUMNS = 128  # padded: cut the left columns every live row leaves unused once they are this many


def size_growth(cache) -> None:
    """Grow this cache (or its parts) by 1/GROW_SHARE of what it holds, at least MIN_GROW
    positions: bounded unused room (mlx-lm's caches add 256 columns per row at a time, 16x a
    16-token request), and amortised copies (a group is copied every max(MIN_GROW, 1/16 of
    its columns) decode steps). At least 4: with 16, SmolLM2's mixed workload held 1.12x its
    live tokens (physical 1.16x), with 4 1.09x (1.14x), at the same speed within the spread
    between runs (docs/engine.md)."""
    for c in getattr(cache, "parts", None) or [cache]:
        if c is not None and hasattr(c, "step"):
            held = c._idx if hasattr(c, "_idx") else c.offset
            c.step = max(MIN_GROW, int(held) // GROW_SHARE)


class LengthGroups(_BaseCache):
    """One layer's running batch as length groups: `parts[g]` a left-padded sub-batch of the
    rank's batch cache class, `group[j]` row j's group (each group's rows contiguous, groups in order),
    `lengths[j]` row j's tokens (its RoPE offset). The model sees one batch: `offset` per
    row, and `attend`."""

    def __init__(self):
        # What one forward needs and every layer shares: the rows' RoPE offsets, each group's
        # row range and attention mask. Every layer's groups hold the same rows, columns and
        # padding, so layer 0 builds them and the others reuse them (RunningKV hands all
        # layers one dict; the model's per-forward make_mask call on layer 0 empties it).
        self.forward: dict = {}
        self.parts: list = []
        self.group: list[int] = []
        self.lengths: list[int] = []


    def members(self, g: int) -> list[int]:
        return [j for j, h in enumerate(self.group) if h == g]

    def columns(self, g: int) -> int:
        return self.parts[g]._idx

    # ---- what the model reads --------------------------------------------------------

    @property
    def offset(self) -> mx.array:
        if "offset" not in self.forward:  # read by every layer before its attend: the lengths before this forward
            self.forward["offset"] = mx.array(self.lengths)
        return self.forward["offset"]

    def make_mask(self, N: int, **kwargs):
        self.forward.clear()  # a new forward (the model asks layer 0's cache once per forward)
        return None  # each group masks its own padding in `attend`

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """Store the new positions and attend, each group over its own store. A group's rows
        are contiguous and the groups in order (RunningKV keeps them so), so each group reads
        a slice of the batch and the outputs concatenate back in row order."""
        L = keys.shape[2]
        if len(self.parts) == 1:
            out = _attend(self.parts[0], queries, keys, values, scale, self.forward, 0)
        else:
            if "bounds" not in self.forward:
                ends = [j + 1 for j in range(len(self.group)) if j + 1 == len(self.group) or self.group[j + 1] != self.group[j]]
                self.forward["bounds"] = list(zip([0, *ends[:-1]], ends))
            out = mx.concatenate([_attend(part, queries[a:b], keys[a:b], values[a:b], scale, self.forward, g)
                                  for g, (part, (a, b)) in enumerate(zip(self.parts, self.forward["bounds"]))])
        self.lengths = [n + L for n in self.lengths]
        return out

    # ---- what RunningKV does with it ---------------------------------------------------

    def add(self, row, g: int | None) -> int:
        """Add a one-row batch (`batch_class.merge([cache])`) after the rows of group g
        (right-aligned with its columns: a longer row pads the group's rows on the left) or,
        for None, as a new last group; returns its row index (every group stays contiguous)."""
        if g is None:
            self.parts.append(row)
            g, j = len(self.parts) - 1, len(self.group)
        else:
            self.parts[g].extend(row)
            j = max(self.members(g)) + 1
        self.group.insert(j, g)
        self.lengths.insert(j, _tokens(row))
        return j

    def place(self, j: int, cache) -> None:
        """Write a prefilled single-stream cache into hole j (its group has the columns)."""
        g = self.group[j]
        place(self.parts[g], self.members(g).index(j), cache)
        self.lengths[j] = cache.offset

    def filter(self, batch_indices) -> None:
        keep = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        groups = []
        for g, part in enumerate(self.parts):
            rows = self.members(g)
            sub = [rows.index(j) for j in keep if self.group[j] == g]
            if sub:
                if sub != list(range(len(rows))):
                    part.filter(mx.array(sub))
                groups.append(g)
        self.parts = [self.parts[g] for g in groups]
        renumber = {g: i for i, g in enumerate(groups)}
        self.group = [renumber[self.group[j]] for j in keep]
        self.lengths = [self.lengths[j] for j in keep]

    def extract(self, idx: int):
        g = self.group[idx]
        return self.parts[g].extract(self.members(g).index(idx))

    def cut_left(self, live: list[bool], at_least: int) -> None:
        """Per group, cut the columns every live row leaves unused (holes' rows are unused)."""
        for g, part in enumerate(self.parts):
            cut_left(part, [live[j] for j in self.members(g)], at_least)

    def allocated_tokens(self) -> int:
        """Positions allocated over all rows (nbytes = this x bytes per position)."""
        return sum(len(self.members(g)) * allocated_positions(p) for g, p in enumerate(self.parts))

    @property
    def state(self):
        return [p.state for p in self.parts]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def empty(self) -> bool:
        return not self.group

    def is_trimmable(self) -> bool:
        return all(p.is_trimmable() for p in self.parts)

    def trim(self, n: int) -> int:
        """Speculation's rejected drafts (a batch of one row: one group)."""
        for p in self.parts:
            p.trim(n)
        self.lengths = [m - n for m in self.lengths]
        return n


def _attend(part, queries, keys, values, scale, forward: dict, g: int):
    size_growth(part)
    if hasattr(part, "attend"):  # two KV forms (engine/kvlate.py), or the 4-bit window (engine/kvwindow.py)
        return part.attend(queries, keys, values, scale)
    if ("mask", g) not in forward:  # before the update: it counts the columns already held
        forward["mask", g] = part.make_mask(keys.shape[2])
    mask = forward["mask", g]
    k, v = part.update_and_fetch(keys, values)
    return scaled_dot_product_attention(queries, k, v, cache=part, scale=scale, mask=mask)


def _tokens(batch) -> int:
    """The tokens of a one-row batch."""
    return batch._idx - int(batch.left_padding.tolist()[0])


def place(batch: BatchKVCache, j: int, cache: KVCache) -> None:
    """Write a prefilled single-stream cache into slot j of `batch`, right-aligned with the
    batch's current column, in place (the slot's old contents are a finished row's)."""
    n, end = cache.offset, batch._idx
    batch.keys[j:j + 1, :, end - n:end, :] = cache.keys[..., :n, :]
    batch.values[j:j + 1, :, end - n:end, :] = cache.values[..., :n, :]
    batch.left_padding[j] = end - n
    batch.offset[j] = n


def cut_left(c: BatchKVCache, live: list[bool], at_least: int) -> int:
    """Cut the columns every live row of `c` leaves unused, once they are `at_least`; the cut."""
    pad = c.left_padding.tolist()
    cut = min((p for p, alive in zip(pad, live) if alive), default=0)
    if cut < at_least or not cut:
        return 0
    c.keys, c.values = c.keys[..., cut:, :], c.values[..., cut:, :]
    c._idx -= cut
    c.left_padding = mx.maximum(c.left_padding - cut, 0)
    return cut


class RunningKV:
    """One rank's running rows: `rows[j]` the uid in slot j (None: a hole), `cache` one
    batch cache per layer (LengthGroups, or the batch class itself when padded)."""

    def __init__(self, batch_class: type, layout: str, slots: bool, kv_capacity: int | None):
        """`slots`: holes and in-place joins (full-precision whole-head rows only: the same on
        every rank); `kv_capacity`: the KV tokens per rank the engine admits by."""
        self.batch_class = batch_class
        self.grouped = layout == "groups"
        self.slots = slots
        self.kv_capacity = kv_capacity
        self.rows: list[int | None] = []
        self.cache: list | None = None

    @property
    def live(self) -> list[int]:
        return [u for u in self.rows if u is not None]

    def _batch(self, cache, forward: dict):
        if not self.grouped:
            return self.batch_class.merge([cache])
        batch = LengthGroups()
        batch.forward = forward  # one for every layer
        batch.add(self.batch_class.merge([cache]), None)
        return batch

    def size_pending(self, caches: list) -> None:
        """A prompt's own cache (prefilled before it joins) grows by PENDING_GROW, not 256, under groups."""
        if self.grouped:
            for c in caches:
                if hasattr(type(c), "step"):  # mlx-lm's caches and the window's (late quantization's inner one: not)
                    c.step = PENDING_GROW

    # ---- rows joining and leaving -------------------------------------------------------

    def join(self, uid: int, pending: list) -> None:
        if self.cache is None:
            forward = {}
            self.cache = [self._batch(c, forward) for c in pending]
            self.rows = [uid]
            return
        n = pending[0].offset
        if self.grouped:
            j = self._hole_for(n) if self.slots else None
            if j is not None:
                for mine, c in zip(self.cache, pending):
                    mine.place(j, c)
                self.rows[j] = uid
                return
            g = self._group_for(n)
            for mine, c in zip(self.cache, pending):
                j = mine.add(self.batch_class.merge([c]), g)
            self.rows.insert(j, uid)  # slots are internal: the decode order maps uids to them
            return
        if None in self.rows and n > self.cache[0]._idx:
            self.compact()  # longer than the batch's columns: it joins by extend, which pads the left
        if None in self.rows:
            j = self.rows.index(None)
            for mine, c in zip(self.cache, pending):
                place(mine, j, c)
            self.rows[j] = uid
            return
        for mine, c in zip(self.cache, pending):
            mine.extend(self.batch_class.merge([c]))
        self.rows.append(uid)

    def _fits(self, g: int, n: int, hole: int | None = None) -> bool:
        """Would a row of n tokens keep every live row of group g (and itself) within its
        padding allowance (admission.pad_allowance)? `hole`: written into that slot (the
        columns do not change)."""
        c = self.cache[0]
        cols = c.columns(g)
        if hole is not None and n > cols:
            return False
        lens = [c.lengths[j] for j in c.members(g) if self.rows[j] is not None] + [n]
        return all(max(cols, n) - m <= pad_allowance(m) for m in lens)

    def _hole_for(self, n: int) -> int | None:
        c = self.cache[0]
        holes = [j for j, u in enumerate(self.rows) if u is None and self._fits(c.group[j], n, hole=j)]
        return min(holes, key=lambda j: c.columns(c.group[j]) - n, default=None)

    def _group_for(self, n: int) -> int | None:
        """The group that pads a row of n tokens least within the allowances (None: a new group)."""
        c = self.cache[0]
        fits = [g for g in range(len(c.parts)) if self._fits(g, n)]
        return min(fits, key=lambda g: abs(c.columns(g) - n), default=None)

    def remove(self, uids: list[int]) -> None:
        """Finished rows leave a hole each (no copy); holes are compacted by one `filter`
        when the policy above says so, else the columns no live row uses are cut."""
        for uid in uids:
            self.rows[self.rows.index(uid)] = None
        live = len(self.live)
        if not live:
            self.rows, self.cache = [], None
        elif not self.slots or self._holes_too_many() or self._over_capacity():
            self.compact()
        else:
            alive = [u is not None for u in self.rows]
            for c in self.cache:
                if self.grouped:
                    c.cut_left(alive, MIN_GROW)
                else:
                    cut_left(c, alive, TRIM_COLUMNS)
            mx.eval([c.state for c in self.cache])

    def _holes_too_many(self) -> bool:
        holes = len(self.rows) - len(self.live)
        if not self.grouped:
            return 2 * holes > len(self.live)
        c = self.cache[0]
        if any(all(self.rows[j] is None for j in c.members(g)) for g in range(len(c.parts))):
            return True  # a group of holes only
        waste = sum(c.columns(c.group[j]) for j, u in enumerate(self.rows) if u is None)
        return waste > GROUP_SLACK * sum(c.lengths[j] for j, u in enumerate(self.rows) if u is not None)

    def _over_capacity(self) -> bool:
        """Admission counts live rows only: holes must not hold the batch past the capacity."""
        return self.kv_capacity is not None and self.held_columns() > self.kv_capacity

    def held_columns(self) -> int:
        c = self.cache[0]
        if self.grouped:
            return sum(c.columns(c.group[j]) for j in range(len(self.rows)))
        return len(self.rows) * c._idx

    def compact(self) -> None:
        keep = [j for j, u in enumerate(self.rows) if u is not None]
        self.rows = [self.rows[j] for j in keep]
        for c in self.cache:
            c.filter(mx.array(keep))  # also trims the left padding the rows no longer need
        mx.eval([c.state for c in self.cache])

    # ---- steps --------------------------------------------------------------------------

    def decode_slots(self, rows: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """(each slot's input token, a hole's 0; the slot of each of `rows`)."""
        slot = {u: j for j, u in enumerate(self.rows) if u is not None}
        if len(rows) != len(slot) or any(u not in slot for u, _ in rows):
            raise AssertionError(f"decode rows {[u for u, _ in rows]} but this rank holds {self.live}: "
                                 f"ranks out of sync")
        tokens = [0] * len(self.rows)
        for u, t in rows:
            tokens[slot[u]] = t
        return tokens, [slot[u] for u, _ in rows]

    def extract(self, uid: int) -> list:
        j = self.rows.index(uid)
        return [c.extract(j) for c in self.cache]

    def can_trim(self) -> bool:
        """Speculation trims every row alike: only a batch of one row and no holes."""
        return self.cache is not None and None not in self.rows and all(c.is_trimmable() for c in self.cache)

    def trim(self, uid: int, n: int) -> None:
        """Drop a verify step's rejected drafts from the one row's KV (this rank's heads)."""
        if self.rows != [uid] or not self.can_trim():
            raise AssertionError(f"trim of row {uid} but this rank holds {self.rows} (trimmable: {self.can_trim()})")
        for c in self.cache:
            c.trim(n)

    # ---- facts --------------------------------------------------------------------------

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache) if self.cache else 0

    def row_tokens(self) -> list[int]:
        """Each live row's tokens (this rank's positions of them, when sequence-sharded)."""
        if not self.cache:
            return []
        c = self.cache[0]
        lens = list(c.lengths) if self.grouped else row_tokens(c)
        return [n for n, u in zip(lens, self.rows) if u is not None]

    def allocated_tokens(self) -> int:
        """Positions allocated over all slots (the batch's bytes = this x bytes per position)."""
        if not self.cache:
            return 0
        c = self.cache[0]
        return c.allocated_tokens() if self.grouped else len(self.rows) * allocated_positions(c)

    def groups(self) -> int:
        return len(self.cache[0].parts) if self.cache and self.grouped else int(bool(self.cache))
