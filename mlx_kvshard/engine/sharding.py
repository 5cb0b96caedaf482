"""Which part of each checkpoint tensor a rank loads: the one place that maps the
ShardPlan onto parameter names.

Column-parallel layers (q/k/v, gate/up) keep their rank's output rows; row-parallel
layers (o, down) keep their rank's input columns and are completed by an all_sum, so
their bias is added by rank 0 alone. A vocab-parallel lm_head keeps its rank's rows.
Everything else (embedding, norms) is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..plan import RankShard

COLUMN_PARALLEL = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "mlp", "up_proj": "mlp"}
ROW_PARALLEL = {"o_proj": "q", "down_proj": "mlp"}


@dataclass(frozen=True)
class Slice:
    axis: int | None  # None: load whole
    start: int = 0
    stop: int = 0
    global_extent: int = 0  # the checkpoint's size along `axis`, from config.json
    zero: bool = False  # row-parallel bias on ranks other than 0


def _feature_range(kind: str, shard: RankShard, cfg: ModelConfig) -> tuple[int, int, int]:
    """(start, stop, global size) in output/input features."""
    hd = cfg.head_dim
    if kind == "q":
        return shard.q_heads[0] * hd, shard.q_heads[1] * hd, cfg.num_attention_heads * hd
    if kind == "kv":
        return shard.kv_heads[0] * hd, shard.kv_heads[1] * hd, cfg.num_key_value_heads * hd
    return shard.mlp_cols[0], shard.mlp_cols[1], cfg.intermediate_size


def tensor_slice(name: str, shard: RankShard, cfg: ModelConfig) -> Slice:
    parts = name.split(".")
    module, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
    if module in COLUMN_PARALLEL:
        a, b, n = _feature_range(COLUMN_PARALLEL[module], shard, cfg)
        return Slice(0, a, b, n)
    if module in ROW_PARALLEL:
        if leaf == "bias":
            return Slice(None, zero=shard.rank != 0)
        a, b, n = _feature_range(ROW_PARALLEL[module], shard, cfg)
        q = cfg.quant_for(name.rsplit(".", 1)[0])
        if q is None:
            return Slice(1, a, b, n)
        # Quantized: the input axis is packed (`bits` bits per value, in uint32 words) and has
        # one scale (and bias) per group; ShardPlan keeps a, b on group boundaries, which are
        # whole words for every width (group_size * bits is a multiple of 32).
        if leaf == "weight":
            return Slice(1, a * q.bits // 32, b * q.bits // 32, n * q.bits // 32)
        return Slice(1, a // q.group_size, b // q.group_size, n // q.group_size)
    if module == "lm_head" and shard.vocab_rows is not None:
        return Slice(0, shard.vocab_rows[0], shard.vocab_rows[1], cfg.vocab_size)
    return Slice(None)
