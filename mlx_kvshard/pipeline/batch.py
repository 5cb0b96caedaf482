"""The serving engine's batch state on a pipeline stage (`serve --pp S`, `generate
--prompts-file --pp S`). Every rank executes the same step messages as under head
sharding (serving/batch.py: rows, slots, prefix blocks, --kv-bits), but holds only its
stage's layers and their KV, and each forward passes the step's rows through the stages:
the first embeds, each sends its activation to the next, the last sends the logits back
to the first (rank 0, its ring neighbour), which samples as the engine always does.

One forward runs at a time: the stages take turns (1/S of the cluster computes at once).
Micro-batching (S groups of rows in flight, each a step behind the next) is not
implemented; see docs/pipeline.md."""

from __future__ import annotations

import mlx.core as mx

from ..serving.batch import BatchState


class PipelineBatchState(BatchState):
    def __init__(self, model, comm, **kw):
        # needs_logits: only the first stage samples; the last computes the logits and sends them there
        super().__init__(model, comm, needs_logits=model.first, **kw)

    def _forward(self, tokens: mx.array, cache: list, last: bool) -> mx.array | None:
        return self.model.serve_forward(tokens, cache, logits=last)

    def _verify(self, step):
        raise AssertionError("a verify step reached a pipeline stage: speculation is refused with --pp")
