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
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
