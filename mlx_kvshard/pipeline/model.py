"""One pipeline stage's model: its layers whole, the embedding on the first stage, the
final norm and lm_head on the last. Its forward receives the previous stage's activation
(or embeds the tokens), runs its layers and sends the result to the next stage; only the
last stage computes logits. Every rank calls it with the same token ids, so every stage
knows the shapes it receives."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ..engine.dist import Comm
from ..engine.kvcache import make_cache
from ..engine.model import TransformerBlock, model_args
from .stages import StagePlan


class _StageDecoder(nn.Module):
    def __init__(self, stages: StagePlan, stage: int, local: Comm):
        super().__init__()
        cfg, args = stages.config, model_args(stages.config)
        if stages.holds_embedding(stage):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        shard, rotate = stages.full.shards[0], stages.full.kv.rotated  # --kv-rotate as in the whole model
        self.layers = [TransformerBlock(cfg, args, shard, local, rotate=rotate) for _ in range(stages.n_layers(stage))]
        if stages.is_last(stage):
            self.norm = nn.RMSNorm(cfg.hidden_size, eps=args.rms_norm_eps)


class StageModel(nn.Module):
    """The ShardedModel interface generate uses (`__call__`, `layers`, `make_cache`) for one stage."""

    def __init__(self, stages: StagePlan, stage: int, comm: Comm):
        super().__init__()
        self.stages, self.stage, self.comm = stages, stage, comm
        self.config = cfg = stages.config
        self.shard = stages.full.shards[0]
        self.kv = stages.full.kv
        # A stage holds its layers whole: their row-parallel all_sums are over a world of one.
        self.model = _StageDecoder(stages, stage, Comm(None))
        if stages.is_last(stage) and not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.layers

    @property
    def first(self) -> bool:
        return self.stages.is_first(self.stage)

    @property
    def last(self) -> bool:
        return self.stages.is_last(self.stage)

    def act_dtype(self) -> mx.Dtype:
        """The activations' dtype on the wire: the same on every stage (the norms' dtype)."""
        return self.layers[0].input_layernorm.weight.dtype

    def _input(self, inputs: mx.array) -> mx.array:
        """The embedded tokens (first stage), or the previous stage's activation."""
        B, L = inputs.shape
        if self.first:
            return self.model.embed_tokens(inputs)
        h = self.comm.recv((B, L, self.config.hidden_size), self.act_dtype(), self.stage - 1)
        mx.eval(h)
        self.comm.pay_link_time()  # --link: the hop lies on the path before this stage's layers
        return h

    def _layers(self, h: mx.array, cache) -> mx.array:
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return h

    def _head(self, h: mx.array) -> mx.array:
        """The last stage's logits of `h`."""
        out = self.model.norm(h)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def __call__(self, inputs: mx.array, cache=None, last_only: bool = False) -> mx.array:
        """The last stage's logits; elsewhere zeros of the same shape (the caller broadcasts
        the last stage's sampled token). Stages before the last are evaluated here, send
        included: nothing downstream of them on this rank would evaluate the send."""
        B, L = inputs.shape
        h = self._layers(self._input(inputs), cache)
        rows = 1 if last_only else L
        if not self.last:
            mx.eval(self.comm.send(h.astype(self.act_dtype()), self.stage + 1))
            return mx.zeros((B, rows, self.config.vocab_size), dtype=self.act_dtype())
        return self._head(h[:, -1:, :] if last_only else h)

    def serve_forward(self, inputs: mx.array, cache: list, logits: bool) -> mx.array | None:
        """The serving engine's forward (every rank, the same calls in the same order),
        evaluated here with the cache. Each stage sends its activation on; with `logits`,
        the last stage sends the last position's logits [B, vocab] to the first stage (its
        ring neighbour), which samples and returns them; every other stage returns None.
        Without `logits` (a prompt chunk that is not the last) the last stage only fills its cache."""
        h = self._layers(self._input(inputs), cache)
        states = [c.state for c in cache]
        if not self.last:
            mx.eval(self.comm.send(h.astype(self.act_dtype()), self.stage + 1), states)
        elif logits:
            out = self._head(h[:, -1:, :])[:, -1, :].astype(self.act_dtype())
            mx.eval(self.comm.send(out, 0), states)
        else:
            mx.eval(states)
        if not (logits and self.first):
            return None
        out = self.comm.recv((inputs.shape[0], self.config.vocab_size), self.act_dtype(), self.stages.stages - 1)
        mx.eval(out)
        return out

    def make_cache(self) -> list:
        return make_cache(self.shard, self.kv, len(self.layers))


def checkpoint_names(first_layer: int) -> Callable[[str], str]:
    """A stage's parameter (or module) name -> the checkpoint's: its layer j is layer first_layer + j."""
    pattern = re.compile(r"^model\.layers\.(\d+)(?=\.|$)")
    return lambda name: pattern.sub(lambda m: f"model.layers.{first_layer + int(m.group(1))}", name)


def load_stage_model(model_dir: Path, stages: StagePlan, comm: Comm, dtype: mx.Dtype | None = None,
                     progress: Callable[[str], None] | None = None) -> StageModel:
    """Build stage `comm.rank` and read only its tensors from the checkpoint."""
    from ..engine.loader import load_slices

    stage = comm.rank
    model = StageModel(stages, stage, comm)
    return load_slices(model, model_dir, stages.full.shards[0], stages.config, stage, dtype, progress,
                       checkpoint_names(stages.layers[stage][0]))
