"""Typed settings: what a rank job needs, built once by the command line (or by the
serving engine and the server, which have no command line) and read by the runtime.
The argparse namespace stops at `mlx_kvshard.cli`; nothing below it sees one.
Pure Python, no MLX."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSettings:
    """Which checkpoint, and in which dtype to compute."""
    source: str = "tiny"  # local HF directory, hub id, or "tiny"
    dtype: str | None = None  # float32/float16/bfloat16/auto; None = the platform default
    max_context: int | None = None  # None = the model's max_position_embeddings
    prefill_step: int = 512  # prompt tokens per prefill chunk


@dataclass(frozen=True)
class ShardingSettings:
    """How the model is split across the group."""
    shares: tuple[float, ...] | None = None  # per-rank split shares (e.g. memory in GB); None = even
    vocab_parallel: bool = False
    backend: str = "any"  # MLX distributed backend
    link: str | None = None  # link profile to emulate (simulation only)


KV_SHARD_MODES = ("replicate", "sequence", "auto")


@dataclass(frozen=True)
class KVSettings:
    """How each rank stores its KV cache (docs: README "KV cache")."""
    bits: int | None = None  # None: the compute dtype; 8 or 4: quantized (mlx-lm's QuantizedKVCache)
    group_size: int = 64  # head_dim elements per quantization scale/bias
    quant_start: int = 0  # keep the cache in full precision until it holds this many tokens
    # world > n_kv_heads: sharers of a KV head keep a replica each ("replicate") or a disjoint
    # share of its positions ("sequence"); "auto" picks the smaller per-rank memory at max context
    shard: str = "replicate"

    def check(self, head_dim: int | None = None) -> None:
        from .errors import UserError

        if self.bits not in (None, 4, 8):
            raise UserError(f"--kv-bits {self.bits}: must be 8 or 4 (omit it for full precision)")
        if self.group_size not in (32, 64, 128):
            raise UserError(f"--kv-group-size {self.group_size}: must be 32, 64 or 128")
        if self.quant_start < 0:
            raise UserError(f"--kv-quant-start {self.quant_start}: must not be negative")
        if self.shard not in KV_SHARD_MODES:
            raise UserError(f"--kv-shard {self.shard}: must be one of {', '.join(KV_SHARD_MODES)}")
        if self.bits and head_dim is not None and head_dim % self.group_size:
            raise UserError(f"--kv-bits {self.bits}: head_dim {head_dim} is not a multiple of "
                            f"--kv-group-size {self.group_size}; choose a group size that divides it")


@dataclass(frozen=True)
class LivenessSettings:
    peer_timeout: float = 10.0
    step_timeout: float = 20.0


@dataclass(frozen=True)
class CheckpointSettings:
    """Generation checkpoints (one-prompt `generate` only)."""
    path: str | None = None  # where rank 0 writes it; None = a temporary file under the cache
    every: int = 16  # tokens between writes; 0 = never
    resume: str | None = None  # a checkpoint to continue


@dataclass(frozen=True)
class OutputSettings:
    """What rank 0 prints for a one-prompt run."""
    json: bool = False
    stats: bool = False
    check_sync: bool = False


@dataclass(frozen=True)
class RankSettings:
    """Everything one rank of a `generate` job needs, besides the prompt and sampling."""
    model: ModelSettings = field(default_factory=ModelSettings)
    sharding: ShardingSettings = field(default_factory=ShardingSettings)
    kv: KVSettings = field(default_factory=KVSettings)
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
