"""One rank's side of the engine: its slice of every sequence's KV cache, and the
batched forward. Every rank executes the same step message in the same order, so every
rank issues the same collectives and holds the same rows.

Running sequences share one mlx-lm `BatchKVCache` per layer (left-padded rows, with
per-row RoPE offsets and padding masks): one sharded forward decodes the whole batch with
the same 2·L all_sums as one sequence. A prompt is prefilled alone into its own
single-stream cache (chunk by chunk, interleaved with decode steps), then merged into the
batch. With --kv-bits these are mlx-lm's `QuantizedKVCache` and our `BatchQuantizedKVCache`
(engine/kvcache.py picks them from the rank's KV settings); prefix-cache blocks (kv/store.py) keep that form.
With sequence-sharded KV a rank's rows hold its share of each row's positions
(engine/seqkv.py), and its blocks its positions of each block.

Which rows the batch holds, in which slots and layout (length groups or one padded batch),
is kv/layout.py's `RunningKV`; this module runs the steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from ..engine.kvcache import batch_cache_class, make_batch_cache
from ..engine.kvlate import adopt, generate_quantizes_at
from ..kv.layout import RunningKV
from ..kv.store import BlockStore
from .wire import Step


@dataclass
class StepOutput:
    """What rank 0 samples from (None elsewhere, unless the logits gather needed every rank)."""
    decode_logits: mx.array | None = None  # [rows, vocab], in row order
    first_logits: dict[int, mx.array] = field(default_factory=dict)  # uid -> [vocab], prompts just prefilled
    audit: list | None = None  # every rank's report, on an AUDIT step
    loaded: tuple[int, bool] | None = None  # a LOAD step: (leading blocks every rank read, every rank's tier ok)
    decode_s: float = 0.0  # time of the decode forward (evaluated: collectives included)
    prefill_s: float = 0.0  # time of the prefill forwards


class BatchState:
    def __init__(self, model, comm, needs_logits: bool, kv_capacity: int | None = None, max_batch: int = 16,
                 block_tokens: int = 64, prefill_step: int = 512, layout: str = "padded"):
        """`needs_logits`: rank 0, or every rank when the lm_head is vocab-parallel (its
        gather is a collective every rank must run). `kv_capacity`: the KV tokens per rank
        the engine admits by (the same on every rank); holes are not kept past it.
        `max_batch` sizes the audit report's buffer (its lists are per admitted row);
        `block_tokens` is the prefix cache's block size (rank 0's index decides the blocks);
        `prefill_step` is --prefill-step (where one-prompt generate's chunks start); `layout`
        the running rows' (kv/layout.py, resolved: groups or padded)."""
        self.prefill_step = prefill_step
        self.model = model
        self.comm = comm
        self.needs_logits = needs_logits
        self.batch_class = batch_cache_class(model.shard, model.kv)  # BatchKVCache, or quantized with --kv-bits
        # holes and in-place joins (not with --kv-bits, nor sequence-sharded KV: the same on every rank)
        slots = self.batch_class is BatchKVCache and model.kv.shard != "sequence"
        self.kv = RunningKV(self.batch_class, layout, slots, kv_capacity)
        self.audit_bytes = 1024 + 96 * max_batch  # the same on every rank: one all_gather of this size
        self.pending: dict[int, list[KVCache]] = {}  # uid -> its prefill cache (model.make_cache()), until it joins
        self.blocks = BlockStore(block_tokens)  # prefix-cache blocks: this rank's heads of each
        self.disk = None  # kv.disk.DiskTier with --prefix-cache-dir (set by the worker on every rank alike)

    def apply(self, step: Step) -> StepOutput:
        out = StepOutput()
        for uid, n in step.trim:
            self.kv.trim(uid, n)
        for uid, start, end, first, parent, persist in step.save:
            self._keep(persist, self.kv.extract(uid), start, end, first, parent)
        if step.remove:
            self._remove(step.remove)
        if step.unlink and self.disk is not None:
            self.disk.unlink(step.unlink)
        if step.disk_off and self.disk is not None:
            self.disk.stop()
        if step.load is not None:
            out.loaded = self._load(*step.load)
        for uid in step.join:
            self.kv.join(uid, self.pending.pop(uid))
        t0 = time.perf_counter()
        if step.decode:
            out.decode_logits = self._verify(step) if step.drafts else self._decode(step.decode)
            self.comm.pay_link_time()  # --link: what the step message and the decode's collectives cost
        t1 = time.perf_counter()
        whole = [p for p in step.prefill if self.kv.slots and p.start == 0 and p.entry < 0 and p.last]
        together = {p.uid for p in whole} if len(whole) > 1 else set()
        if together:  # several whole prompts: one left-padded forward for all of them
            out.first_logits.update(self._prefill_together(whole))
        for p in step.prefill:
            if p.uid in together:
                continue
            logits = self._prefill(p)
            if logits is not None:
                out.first_logits[p.uid] = logits
        self.comm.pay_link_time()  # --link: the prefills' collectives (the message's, on a prefill-only step)
        out.decode_s, out.prefill_s = t1 - t0, time.perf_counter() - t1
        for uid, start, end, first, parent, persist in step.put:
            self._keep(persist, self.pending[uid], start, end, first, parent)
        self.blocks.drop(step.drop)  # after this step's prefills: a hit taken this step has copied its blocks
        if step.audit:
            from ..engine.dist import gather_json

            out.audit = gather_json(self.comm, self.report(), max_bytes=self.audit_bytes)
        return out

    # ---- prefix blocks and the disk tier ------------------------------------------------

    def _keep(self, persist: int, caches: list, start: int, end: int, first: int, parent: int) -> None:
        ids = self.blocks.put(caches, start, end, first, parent)
        if persist and self.disk is not None:  # written off the step thread (or dropped when the disk lags)
            for i in ids:
                self.disk.write(i, self.blocks.blocks[i][0], self.blocks.blocks[i][1])

    def _load(self, parent: int, ids: list[int]) -> tuple[int, bool]:
        """Read disk blocks back into RAM. Each rank reads and verifies its own slices; one
        all_gather of (blocks read, tier ok) gives every rank the same verdict: keep the
        leading blocks every rank read, and every rank recomputes the rest."""
        held = 0
        while held < len(ids) and ids[held] in self.blocks:  # still in RAM here (its DROP not sent yet)
            held += 1
        layers = []
        if self.disk is not None and held < len(ids):
            layers = self.disk.read(ids[held - 1] if held else parent, ids[held:])
        mine = [held + len(layers), int(self.disk is not None and not self.disk.broken and not self.disk.off)]
        every = np.array(self.comm.all_gather(mx.array(mine, dtype=mx.int32)[None])).reshape(-1, 2)
        valid, ok = int(every[:, 0].min()), bool(every[:, 1].min())
        for k in range(held, valid):
            self.blocks.adopt(ids[k], ids[k - 1] if k else parent, layers[k - held])
        return valid, ok

    # ---- steps ------------------------------------------------------------------------

    def _forward(self, tokens: mx.array, cache: list, last: bool) -> mx.array | None:
        """One forward, evaluated on its own so its all_sums run in the same order on every
        rank whatever else the step holds. Every rank evaluates the same collectives: a
        prompt chunk that is not the last evaluates only the cache (the last layer's
        all_sums are skipped everywhere); otherwise the whole model, and the logits of the
        last position where this rank samples (or joins the vocab-parallel gather)."""
        if not last:
            self.model.model(tokens, cache)
            mx.eval([c.state for c in cache])
            return None
        if self.needs_logits:
            logits = self.model(tokens, cache, last_only=True)[:, -1, :]
            mx.eval(logits, [c.state for c in cache])
            return logits
        mx.eval(self.model.model(tokens, cache), [c.state for c in cache])
        return None

    # the running rows (kv/layout.py), as the pipeline's micro-batches and the report read them
    @property
    def rows(self) -> list[int | None]:
        return self.kv.rows

    @property
    def cache(self) -> list | None:
        return self.kv.cache

    @property
    def slots(self) -> bool:
        return self.kv.slots

    @property
    def live(self) -> list[int]:
        return self.kv.live

    def _decode(self, rows: list[tuple[int, int]]) -> mx.array | None:
        """One decode step for every slot (a hole decodes token 0, its output unused);
        the logits come back in `rows` order."""
        tokens, order = self.kv.decode_slots(rows)
        logits = self._forward(mx.array(tokens, dtype=mx.uint32)[:, None], self.cache, last=True)
        if logits is None or order == list(range(len(self.rows))):
            return logits
        return logits[mx.array(order)]

    def _verify(self, step: Step) -> mx.array | None:
        """A speculative verify step for the batch's one row: its input token and the drafts
        in one forward (2·L all_sums for up to m+1 tokens); rank 0 samples every position."""
        (uid, token), = step.decode
        if self.rows != [uid]:
            raise AssertionError(f"verify of row {uid} but this rank holds {self.rows}: ranks out of sync")
        tokens = mx.array([token, *step.drafts], dtype=mx.uint32)[None]
        if self.needs_logits:
            logits = self.model(tokens, self.cache)[0]
            mx.eval(logits, [c.state for c in self.cache])
            return logits
        mx.eval(self.model.model(tokens, self.cache), [c.state for c in self.cache])
        return None

    def can_trim(self) -> bool:
        return self.kv.can_trim()

    def _prefill(self, p) -> mx.array | None:
        if p.start == p.hit:  # its first chunk (after the positions a prefix hit reuses)
            self.pending[p.uid] = self._start_cache(p.entry, p.hit)
            self.kv.size_pending(self.pending[p.uid])
        cache = self.pending[p.uid]
        if cache[0].offset != p.start:
            raise AssertionError(f"prefill of {p.uid} at {p.start}, but its cache holds {cache[0].offset}")
        tokens, kv = list(p.tokens), self.model.kv
        if kv.late:  # convert where one-prompt generate does, whatever our chunks
            at = generate_quantizes_at(kv.quant_start, self.prefill_step, p.start + len(tokens), p.last)
            for c in cache:
                c.start = at
            if p.start < at < p.start + len(tokens):
                self._forward(mx.array(tokens[:at - p.start], dtype=mx.uint32)[None], cache, last=False)
                tokens = tokens[at - p.start:]
        logits = self._forward(mx.array(tokens, dtype=mx.uint32)[None], cache, last=p.last)
        if kv.late and p.last:
            for c in cache:
                c.start = kv.quant_start  # a row joining in full precision converts at T in the batch
        return logits[0] if logits is not None else None

    def _prefill_together(self, prompts: list) -> dict[int, mx.array]:
        """Whole prompts with no prefix hit, prefilled as one left-padded batch (mlx-lm's
        BatchKVCache masks the padding and starts each row's RoPE at 0): one forward's
        weight reads and 2·L all_sums instead of one per prompt (8 prompts of 64 tokens:
        0.99 s vs 1.3 s on the small preset here). Each row is then extracted into its own
        cache, as if prefilled alone."""
        longest = max(len(p.tokens) for p in prompts)
        pad = [longest - len(p.tokens) for p in prompts]
        tokens = mx.array([[0] * k + list(p.tokens) for k, p in zip(pad, prompts)], dtype=mx.uint32)
        cache = make_batch_cache(self.model.shard, self.model.kv, len(self.model.model.layers), pad)
        logits = self._forward(tokens, cache, last=True)
        for i, p in enumerate(prompts):
            self.pending[p.uid] = [c.extract(i) for c in cache]
            self.kv.size_pending(self.pending[p.uid])
        return {} if logits is None else {p.uid: logits[i] for i, p in enumerate(prompts)}

    def _start_cache(self, entry: int, hit: int) -> list[KVCache]:
        if entry >= 0:  # a prefix-cache hit: the first `hit` positions of a block chain are this prompt's too
            caches, kv = self.blocks.start(entry, hit), self.model.kv
            if kv.late:  # quantized at --kv-quant-start, as a fresh prompt is
                caches = [adopt(c, kv.quant_start, kv.group_size, kv.bits) for c in caches]
            return caches
        return self.model.make_cache()

    def _remove(self, uids) -> None:
        """Drop finished sequences: pending ones by key, batch rows through the layout."""
        rows = []
        for uid in uids:
            if uid in self.pending:
                del self.pending[uid]
            else:
                rows.append(uid)
        if rows:
            self.kv.remove(rows)

    # ---- facts ------------------------------------------------------------------------

    def kv_bytes(self) -> int:
        return self.kv.nbytes() + sum(c.nbytes for cache in self.pending.values() for c in cache)

    def report(self) -> dict:
        return {"rank": self.comm.rank, "rows": self.live, "slots": len(self.rows), "row_tokens": self.kv.row_tokens(),
                "pending": {str(u): c[0].offset for u, c in self.pending.items()},
                "kv_bytes": self.kv_bytes(), "allocated_tokens": self.kv.allocated_tokens(),
                "batch_kv_bytes": self.kv.nbytes(), "groups": self.kv.groups(),
                "entries": self.blocks.summary(),  # thousands of blocks: a count and checksum, not the list
                "entry_bytes": self.blocks.nbytes}
