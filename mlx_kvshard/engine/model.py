"""A Llama-class decoder (llama, mistral, qwen2, qwen3) that holds one rank's heads.

It reads like single-machine code: the layers are built with this rank's local head and
column counts, and the two row-parallel projections (o_proj, down_proj) are followed by
the all_sum that completes them. Which slice a rank owns is decided by the ShardPlan;
which checkpoint rows/columns that means is in sharding.py.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.rope_utils import initialize_rope

from ..config import ModelConfig
from .dist import Comm
from ..errors import UserError
from ..models.architectures import mlx_lm_model_class
from ..plan import RankShard
from ..settings import KVSettings
from .attention import rotate_heads, sequence_sharded_attention
from .kvcache import make_cache


def model_args(cfg: ModelConfig):
    """mlx-lm's own parsing of config.json (defaults, rope_parameters, ...)."""
    _, args_cls = mlx_lm_model_class(cfg.model_type)
    args = args_cls.from_dict(cfg.raw)
    if any(t != "full_attention" for t in (getattr(args, "layer_types", None) or [])):
        raise UserError("sliding-window attention layers (layer_types) are not supported yet")
    return args


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, args, shard: RankShard, comm: Comm, sequence_merge: bool = False,
                 rotate: bool = False):
        """`sequence_merge`: the plan splits some KV head by sequence position (attention.py);
        `rotate`: q, k, v are Hadamard-rotated before the (quantized) cache, the output back."""
        super().__init__()
        self.shard = shard
        self.sequence_merge = sequence_merge
        self.rotate = rotate
        dim, head_dim = cfg.hidden_size, cfg.head_dim
        self.n_heads = shard.local_q_heads
        self.n_kv_heads = shard.local_kv_heads
        self.scale = head_dim**-0.5
        self.comm = comm
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        # qwen2 has q/k/v bias but none on o_proj; llama's attention_bias covers o_proj too.
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=bias and cfg.model_type != "qwen2")
        if cfg.model_type == "qwen3":
            self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            head_dim,
            args.rope_theta,
            getattr(args, "rope_traditional", False),
            args.rope_scaling,
            args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask=None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries = queries.transpose(0, 2, 1, 3)
        keys = keys.transpose(0, 2, 1, 3)
        values = values.transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if self.rotate:
            queries, keys, values = rotate_heads(queries), rotate_heads(keys), rotate_heads(values)
        if self.sequence_merge:
            out = sequence_sharded_attention(queries, keys, values, cache, self.scale, self.shard, self.comm, mask)
        elif hasattr(cache, "attend"):  # a batch of rows in two KV forms (engine/kvlate.py)
            out = cache.attend(queries, keys, values, self.scale)
        else:
            if cache is not None:
                # The cache holds only this rank's KV heads; it never leaves the rank.
                keys, values = cache.update_and_fetch(keys, values)
            out = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=self.scale, mask=mask)
        if self.rotate:
            out = rotate_heads(out)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        # Row-parallel: each rank's heads give a partial sum of the full projection.
        return self.comm.all_sum(self.o_proj(out))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: RankShard, comm: Comm, bias: bool = False):
        super().__init__()
        dim, cols = cfg.hidden_size, shard.local_mlp_cols
        self.comm = comm
        self.gate_proj = nn.Linear(dim, cols, bias=bias)
        self.up_proj = nn.Linear(dim, cols, bias=bias)
        self.down_proj = nn.Linear(cols, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.comm.all_sum(self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x))))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, args, shard: RankShard, comm: Comm, sequence_merge: bool = False,
                 rotate: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg, args, shard, comm, sequence_merge, rotate)
        self.mlp = MLP(cfg, shard, comm, bias=bool(getattr(args, "mlp_bias", False)))
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, args, shard: RankShard, comm: Comm, sequence_merge: bool = False,
                 rotate: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [TransformerBlock(cfg, args, shard, comm, sequence_merge, rotate)
                       for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class ShardedModel(nn.Module):
    """One rank's part of the model; parameter names match the HF checkpoint."""

    def __init__(self, cfg: ModelConfig, shard: RankShard, comm: Comm, vocab_sizes: list[int] | None = None,
                 kv: KVSettings | None = None):
        """`vocab_sizes`: every rank's lm_head rows, when the plan is vocab-parallel; `kv`: how
        the cache stores this rank's heads (the plan's, its shard mode resolved). In sequence
        mode some KV head is split by position (the plan puts it there only when ranks
        outnumber KV heads), and every rank joins one LSE all_gather per layer."""
        super().__init__()
        self.config = cfg
        self.shard = shard
        self.comm = comm
        self.kv = kv or KVSettings()
        self._vocab_sizes = tuple(vocab_sizes or ())
        self.model = DecoderModel(cfg, model_args(cfg), shard, comm, sequence_merge=self.kv.shard == "sequence",
                                  rotate=self.kv.rotated)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, shard.local_vocab(cfg.vocab_size), bias=False)

    def __call__(self, inputs: mx.array, cache=None, last_only: bool = False) -> mx.array:
        out = self.model(inputs, cache)
        if last_only:  # generation samples from the last position only
            out = out[:, -1:, :]
        if self.shard.vocab_rows is None:
            if self.config.tie_word_embeddings:
                return self.model.embed_tokens.as_linear(out)
            return self.lm_head(out)
        # Vocab-parallel: this rank's rows of the logits, then one gather of all of them.
        if self.config.tie_word_embeddings:
            local = _rows_as_linear(self.model.embed_tokens, *self.shard.vocab_rows, out)
        else:
            local = self.lm_head(out)
        return self.comm.gather_last_axis(local, self._vocab_sizes)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list:
        return make_cache(self.shard, self.kv, len(self.layers))


def _rows_as_linear(embed: nn.Module, start: int, stop: int, x: mx.array) -> mx.array:
    """x @ embed.weight[start:stop].T, for a plain or a quantized embedding (row slices
    of a contiguous matrix are views: nothing is copied)."""
    if isinstance(embed, nn.QuantizedEmbedding):
        biases = embed.get("biases")  # none in the microscaling modes
        return mx.quantized_matmul(x, embed["weight"][start:stop], scales=embed["scales"][start:stop],
                                   biases=None if biases is None else biases[start:stop], transpose=True,
                                   group_size=embed.group_size, bits=embed.bits, mode=embed.mode)
    return x @ embed.weight[start:stop].T
