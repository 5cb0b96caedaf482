"""The serving engine's batch state on a pipeline stage (`serve --pp S`, `generate
--prompts-file --pp S`). Every rank executes the same step messages as under head
sharding (serving/batch.py: rows, slots, prefix blocks, --kv-bits), but holds only its
stage's layers and their KV, and each forward passes the step's rows through the stages:
the first embeds, each sends its activation to the next, the last sends the logits back
to the first (rank 0, its ring neighbour), which samples as the engine always does.

Steps with prefills, joins or removals run the stages in turn (one computes at a time).
A decode-only step with at least S rows may carry MICRO k (rank 0 decides, `micro_rounds`):
the rows split into S contiguous groups, each with its own slice of the batch cache, and
k tokens per row run as k·S items through a pipeline of k·S + S − 1 ticks. At tick t
stage s works on item t − s (group (t − s) mod S); then neighbours exchange: stage 0
receives the logits of item t − S + 1 from the last stage and sends item t on, every other
stage sends first and then receives its next input (one receiver first breaks the ring's
cycle, so no send waits on a send). Rank 0 samples each group's logits at the end of a
tick and feeds the tokens to that group's next item, S ticks after its last: every stage
works every tick once the pipe is full. Micro-batches gain on what scales with rows (each
stage's KV reads, compute), not on the weights, which each stage reads once per tick."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from ..plan import contiguous_ranges, split_counts
from ..serving.batch import BatchState, StepOutput
from ..serving.wire import Step

MAX_MICRO_ROUNDS = 8  # tokens per row in one micro-batched step: new arrivals wait at most this many


class PipelineBatchState(BatchState):
    def __init__(self, model, comm, **kw):
        # needs_logits: only the first stage samples; the last computes the logits and sends them there
        super().__init__(model, comm, needs_logits=model.first, **kw)
        # rank 0: (uids of a group's rows, None for a hole; their logits) -> the tokens to feed next
        self.on_logits: Callable[[list, mx.array], list[int]] | None = None
        self.micro_steps = 0

    def apply(self, step: Step) -> StepOutput:
        return self._micro(step) if step.micro else super().apply(step)

    def _forward(self, tokens: mx.array, cache: list, last: bool) -> mx.array | None:
        return self.model.serve_forward(tokens, cache, logits=last)

    def _verify(self, step):
        raise AssertionError("a verify step reached a pipeline stage: speculation is refused with --pp")

    def _micro(self, step: Step) -> StepOutput:
        m, rounds = self.model, step.micro
        S, comm = m.stages.stages, m.comm
        if len(self.rows) < S:
            raise AssertionError(f"micro-batched decode of {len(self.rows)} slots on {S} stages: ranks out of sync")
        tokens, _ = self.kv.decode_slots(step.decode)  # a hole decodes token 0, its output unused
        bounds = split_rows(len(self.rows), S)
        groups = [[rows_of(c, a, b) for c in self.cache] for a, b in bounds]
        dt, items, inbox = m.act_dtype(), rounds * S, None
        t0 = time.perf_counter()
        for tick in range(items + S - 1):
            i, out = tick - m.stage, None
            if 0 <= i < items:
                (a, b), cache = bounds[i % S], groups[i % S]
                x = m.model.embed_tokens(mx.array(tokens[a:b], dtype=mx.uint32)[:, None]) if m.first else inbox
                h = m._layers(x, cache)
                out = (m._head(h)[:, -1, :] if m.last else h).astype(dt)
                mx.eval(out, [c.state for c in cache])
            j = tick - (S - 1) if m.first else tick - (m.stage - 1)  # the item this stage receives now
            got = 0 <= j < items
            a, b = bounds[j % S]
            if m.first:
                if got:
                    logits = comm.recv((b - a, m.config.vocab_size), dt, S - 1)
                    mx.eval(logits)
                    comm.pay_link_time()  # --link: the hop back to the first stage
                if out is not None:
                    mx.eval(comm.send(out, 1))
                if got:  # sampled after the send: the next stage need not wait for it
                    tokens[a:b] = self.on_logits(self.rows[a:b], logits)
            else:
                if out is not None:
                    mx.eval(comm.send(out, (m.stage + 1) % S))
                if got:
                    inbox = comm.recv((b - a, 1, m.config.hidden_size), dt, m.stage - 1)
                    mx.eval(inbox)
                    comm.pay_link_time()
        for mine, parts in zip(self.cache, zip(*groups)):
            join_rows(mine, list(parts))
        mx.eval([c.state for c in self.cache])
        self.micro_steps += 1
        return StepOutput(decode_s=(time.perf_counter() - t0) / rounds)


def micro_rounds(step: Step, scheduler, state: PipelineBatchState, pending: bool) -> int:
    """Rank 0: the tokens per row this step may decode micro-batched (0: the stages in turn).
    Only a decode-only step (anything else in it changes rows or needs the stages in order),
    with nothing arriving, prefilling or joining, on full-precision slots (--kv-bits batch
    caches have another layout), with at least one row per stage; never past any row's
    budget, so every row's KV stays within what admission reserved for it."""
    stages = state.model.stages.stages
    if pending or scheduler.prefilling or scheduler.ready or not state.slots or len(state.rows) < stages:
        return 0
    if step != replace(Step(), index=step.index, decode=step.decode) or not step.decode:
        return 0
    left = min(s.budget - len(s.generated) for s in scheduler.running)
    rounds = min(MAX_MICRO_ROUNDS, left)
    return rounds if rounds >= 2 else 0  # one round fills and drains the pipe for a single token


def split_rows(n: int, groups: int) -> list[tuple[int, int]]:
    """[start, stop) of `groups` contiguous row ranges of `n` rows, the first ones a row longer
    (the plan's even split, as it splits heads)."""
    return contiguous_ranges(split_counts(n, [1] * groups))


def rows_of(c: BatchKVCache, a: int, b: int) -> BatchKVCache:
    """Rows [a, b) of a batch cache as a cache of their own (same columns)."""
    g = BatchKVCache([0] * (b - a))
    g.keys, g.values = c.keys[a:b], c.values[a:b]
    g.offset, g.left_padding, g._idx = c.offset[a:b], c.left_padding[a:b], c._idx
    return g


def join_rows(c: BatchKVCache, parts: list[BatchKVCache]) -> None:
    """The groups back into one batch cache, in row order: every group advanced alike, so
    their columns (and allocated sizes) agree."""
    c.keys = mx.concatenate([p.keys for p in parts])
    c.values = mx.concatenate([p.values for p in parts])
    c.offset = mx.concatenate([p.offset for p in parts])
    c.left_padding = mx.concatenate([p.left_padding for p in parts])
    c._idx = parts[0]._idx
