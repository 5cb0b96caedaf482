"""Which layers each pipeline stage holds, and what that costs in memory. Pure Python.

Stage s is rank s, so every boundary s -> s+1 is a ring neighbour (MLX's ring backend
sends only to neighbours) and the last stage's neighbour is the first. Each stage holds
its layers whole (all heads: no tensor parallelism inside a stage, see `check_world`),
the first the embedding, the last the final norm and lm_head (the embedding too when
they are tied). Layers follow the stages' shares (memory, as --shares and a hostfile's
memory_gb); uneven counts are fine (7 layers on 3 stages: 3, 2, 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..config import ModelConfig
from ..errors import UserError
from ..plan import ShardPlan, split_counts

# Why a stage cannot be tensor-parallel on MLX 0.32.4 (measured on the ring backend):
HYBRID_SHORT = "MLX's ring backend cannot split a group, so stages could not run concurrently"
HYBRID_REFUSAL = ("tensor parallelism inside a pipeline stage is not supported: MLX's ring backend cannot "
                  "split a group (Group.split raises '[ring] Group split not supported', and a second "
                  "mx.distributed.init returns the same global group), so a stage's all_sums would include "
                  "every rank and the stages could not run concurrently")


def check_world(pp: int, world: int) -> None:
    """--pp S runs one stage per rank: a world of exactly S (T = world / S must be 1)."""
    if pp > 1 and world != pp:
        raise UserError(f"--pp {pp} on a world of {world}: every rank is one stage, so the world must be "
                        f"{pp}; {HYBRID_REFUSAL}")


@dataclass(frozen=True)
class StagePlan:
    full: ShardPlan  # the world-1 plan: every stage holds its layers whole
    layers: tuple[tuple[int, int], ...]  # [start, stop) of each stage
    shares: tuple[float, ...]

    @classmethod
    def build(cls, cfg: ModelConfig, stages: int, shares: Sequence[float] | None = None,
              compute_dtype: str | None = None, kv=None, context: int | None = None) -> "StagePlan":
        n = cfg.num_hidden_layers
        if stages < 2:
            raise UserError(f"--pp {stages}: a pipeline needs at least 2 stages")
        if stages > n:
            raise UserError(f"--pp {stages}: the model has {n} layers, at most one stage per layer")
        shares = tuple(float(x) for x in (shares or [1.0] * stages))
        if len(shares) != stages:
            raise UserError(f"got {len(shares)} shares for {stages} pipeline stages; give one per stage")
        counts = split_counts(n, shares)
        ranges, start = [], 0
        for c in counts:
            ranges.append((start, start + c))
            start += c
        full = ShardPlan.build(cfg, 1, compute_dtype=compute_dtype, kv=kv, context=context)
        return cls(full, tuple(ranges), shares)

    @property
    def config(self) -> ModelConfig:
        return self.full.config

    @property
    def stages(self) -> int:
        return len(self.layers)

    def is_first(self, s: int) -> bool:
        return s == 0

    def is_last(self, s: int) -> bool:
        return s == self.stages - 1

    def n_layers(self, s: int) -> int:
        a, b = self.layers[s]
        return b - a

    def holds_embedding(self, s: int) -> bool:
        return self.is_first(s) or (self.is_last(s) and self.config.tie_word_embeddings)

    def layers_bytes(self, s: int) -> int:
        return sum(self.full.layer_bytes(0, layer) for layer in range(*self.layers[s]))

    def weight_bytes(self, s: int) -> int:
        """Bytes stage s stores: its layers, the embedding (first; last too when tied), the
        final norm and lm_head (last)."""
        p, cfg = self.full, self.config
        b = self.layers_bytes(s)
        if self.holds_embedding(s):
            b += p._linear_bytes(cfg.vocab_size, cfg.hidden_size, "model.embed_tokens")
        if self.is_last(s):
            b += cfg.hidden_size * p._param_bytes
            if not cfg.tie_word_embeddings:
                b += p.logits_bytes(0)
        return b

    def decode_read_bytes(self, s: int) -> int:
        """Weight bytes one decode step reads on stage s (an embedding lookup reads a row)."""
        p, cfg = self.full, self.config
        b = self.layers_bytes(s)
        if self.is_last(s):
            b += cfg.hidden_size * p._param_bytes + p.logits_bytes(0)
        return b

    def kv_bytes_per_token(self, s: int) -> int:
        """KV bytes per position on stage s: its layers' share of the whole model's."""
        return self.full.kv_bytes_per_token(0) * self.n_layers(s) // self.config.num_hidden_layers

    def kv_bytes(self, s: int, context: int, batch: int = 1) -> int:
        return batch * context * self.kv_bytes_per_token(s)

    def describe(self) -> str:
        return ", ".join(f"stage {s}: layers {a}-{b - 1}" for s, (a, b) in enumerate(self.layers))
