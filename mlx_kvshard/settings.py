"""Typed settings: what a rank job needs, built once by the command line (or by the
serving engine and the server, which have no command line) and read by the runtime.
The argparse namespace stops at `mlx_kvshard.cli`; nothing below it sees one.
Pure Python, no MLX."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace

from .errors import UserError

# Liveness timing (liveness/client.py sends heartbeats; the coordinator judges silence).
HEARTBEAT_S = 0.5
DEFAULT_PEER_TIMEOUT_S = 10.0
DEFAULT_STEP_TIMEOUT_S = 20.0

DEFAULT_CHECKPOINT_EVERY = 16
DTYPES = ("float32", "float16", "bfloat16", "auto")


def default_dtype(requested: str | None) -> str:
    """The compute dtype name to use ('auto' = the checkpoint's)."""
    if requested:
        return requested
    # MLX's Linux build runs on the CPU, where half precision is slow and drifts.
    return "float32" if platform.system() == "Linux" else "auto"


def parse_numbers(text: str | None, flag: str) -> list[float] | None:
    """'64,24,16' -> [64.0, 24.0, 16.0]; None or '' -> None."""
    if not text:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers like 64,24,16") from None
    if any(not v > 0 for v in values):
        raise UserError(f"{flag} {text!r}: every value must be positive")
    return values


def parse_shares(text: str | None, flag: str = "--shares") -> tuple[float, ...] | None:
    """Per-rank split shares, e.g. memory in GB: '64,24,16'."""
    values = parse_numbers(text, flag)
    return tuple(values) if values is not None else None


@dataclass(frozen=True)
class ModelSettings:
    """Which checkpoint, and in which dtype to compute."""
    source: str = "tiny"  # local HF directory, hub id, or "tiny"
    dtype: str | None = None  # float32/float16/bfloat16/auto; None = the platform default
    max_context: int | None = None  # None = the model's max_position_embeddings
    prefill_step: int = 512  # prompt tokens per prefill chunk

    @property
    def dtype_name(self) -> str:
        return default_dtype(self.dtype)

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if self.prefill_step < 1:
            raise UserError(f"--prefill-step {self.prefill_step}: must be at least 1")
        if self.max_context is not None and self.max_context < 2:
            raise UserError(f"--max-context {self.max_context}: must be at least 2")


@dataclass(frozen=True)
class ShardingSettings:
    """How the model is split across the group."""
    shares: tuple[float, ...] | None = None  # per-rank split shares (e.g. memory in GB); None = even
    vocab_parallel: bool = False
    backend: str = "any"  # MLX distributed backend
    link: str | None = None  # link profile to emulate (simulation only)
    pp: int = 1  # pipeline stages (--pp): the layers split into pp contiguous stages, one rank each

    def validate(self) -> None:
        if self.pp < 1:
            raise UserError(f"--pp {self.pp}: must be at least 1 (1 = no pipeline)")
        if self.pp > 1 and self.vocab_parallel:
            raise UserError(f"--pp {self.pp} with --vocab-parallel: the last pipeline stage holds the whole "
                            f"lm_head; drop --vocab-parallel")


KV_SHARD_MODES = ("replicate", "sequence", "auto")
KV_ROTATE_MODES = {"auto": None, "on": True, "off": False}
# KV bit widths rotated unless --kv-rotate off: measured on real text, docs/kv-quality.md
DEFAULT_ROTATE_BITS: tuple[int, ...] = (4,)
# --kv-fp-window default per bit width (the last W positions of each sequence kept in full
# precision, older ones quantized): measured on real text, docs/kv-quality.md
DEFAULT_FP_WINDOW: dict[int, int] = {4: 16}


def hadamard_size_ok(n: int) -> bool:
    """mx.hadamard_transform takes m * 2^k elements for m in 1, 12, 20, 28."""
    for m in (1, 12, 20, 28):
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            return True
    return False


@dataclass(frozen=True)
class KVSettings:
    """How each rank stores its KV cache (docs: README "KV cache")."""
    bits: int | None = None  # None: the compute dtype; 8 or 4: quantized (mlx-lm's QuantizedKVCache)
    group_size: int = 64  # head_dim elements per quantization scale/bias
    quant_start: int = 0  # keep the cache in full precision until it holds this many tokens
    # world > n_kv_heads: sharers of a KV head keep a replica each ("replicate") or a disjoint
    # share of its positions ("sequence"); "auto" picks the smaller per-rank memory at max context
    shard: str = "replicate"
    # Hadamard-rotate q, k, v per head before the cache, the attention output back (engine/attention.py):
    # True, False, or None = the default for the bit width (DEFAULT_ROTATE_BITS)
    rotate: bool | None = None
    # with bits: each sequence's last W positions stay in the compute dtype, older ones are
    # quantized (engine/kvwindow.py); None = the default for the bit width (DEFAULT_FP_WINDOW)
    fp_window: int | None = None

    @property
    def rotated(self) -> bool:
        return self.bits in DEFAULT_ROTATE_BITS if self.rotate is None else self.rotate

    @property
    def late(self) -> bool:
        """Late quantization in use: full precision until --kv-quant-start tokens, then quantized."""
        return self.bits is not None and self.quant_start > 0

    @property
    def window(self) -> int:
        """The full-precision window in use (0: none). The default yields to --kv-quant-start
        and to sequence-sharded heads (ShardPlan resolves that), which take no window."""
        if self.bits is None:
            return 0
        if self.fp_window is None:
            return 0 if self.quant_start or self.shard == "sequence" else DEFAULT_FP_WINDOW.get(self.bits, 0)
        return self.fp_window

    def full_precision(self) -> "KVSettings":
        """The same layout (shard mode) storing K and V in the compute dtype."""
        return replace(self, bits=None, quant_start=0, fp_window=None)

    def check(self, head_dim: int | None = None) -> None:
        from .errors import UserError

        if self.bits not in (None, 4, 8):
            raise UserError(f"--kv-bits {self.bits}: must be 8 or 4 (omit it for full precision)")
        if self.group_size not in (32, 64, 128):
            raise UserError(f"--kv-group-size {self.group_size}: must be 32, 64 or 128")
        if self.quant_start < 0:
            raise UserError(f"--kv-quant-start {self.quant_start}: must not be negative")
        if self.fp_window is not None and self.fp_window < 0:
            raise UserError(f"--kv-fp-window {self.fp_window}: must not be negative (0: no window)")
        if self.fp_window and self.bits is None:
            raise UserError(f"--kv-fp-window {self.fp_window}: a full-precision window needs --kv-bits 8 or 4")
        if self.fp_window and self.quant_start:
            raise UserError(f"--kv-fp-window {self.fp_window} with --kv-quant-start {self.quant_start}: choose one "
                            f"(late quantization keeps everything in full precision until T tokens)")
        if self.shard not in KV_SHARD_MODES:
            raise UserError(f"--kv-shard {self.shard}: must be one of {', '.join(KV_SHARD_MODES)}")
        if self.rotated and head_dim is not None and not hadamard_size_ok(head_dim):
            raise UserError(f"--kv-rotate: head_dim {head_dim} has no Hadamard transform (it takes 2^k, or 12, 20 "
                            f"or 28 times 2^k); use --kv-rotate off")
        if self.bits and head_dim is not None and head_dim % self.group_size:
            raise UserError(f"--kv-bits {self.bits}: head_dim {head_dim} is not a multiple of "
                            f"--kv-group-size {self.group_size}; choose a group size that divides it")


@dataclass(frozen=True)
class PerplexitySettings:
    """`mlx-kvshard perplexity`: which text, scored in windows of how many tokens."""
    file: str
    context: int | None = None  # tokens per window; None = the whole text, up to the max context
    compare_fp: bool = False  # also run full-precision KV beside it: KL divergence, top-1 agreement
    json: bool = False

    def validate(self) -> None:
        if self.context is not None and self.context < 2:
            raise UserError(f"--context {self.context}: a window needs at least 2 tokens")


@dataclass(frozen=True)
class LivenessSettings:
    peer_timeout: float = DEFAULT_PEER_TIMEOUT_S  # a rank silent on the side channel this long is lost
    step_timeout: float = DEFAULT_STEP_TIMEOUT_S  # a token taking longer stops every rank

    def validate(self) -> None:
        for flag, value in (("--peer-timeout", self.peer_timeout), ("--step-timeout", self.step_timeout)):
            if not value > 0:
                raise UserError(f"{flag} {value}: must be a positive number of seconds")
        if self.peer_timeout < 4 * HEARTBEAT_S:
            raise UserError(f"--peer-timeout {self.peer_timeout}: must be at least {4 * HEARTBEAT_S:g} s "
                            f"(heartbeats go every {HEARTBEAT_S:g} s)")


@dataclass(frozen=True)
class CheckpointSettings:
    """Generation checkpoints (one-prompt `generate` only)."""
    path: str | None = None  # where rank 0 writes it; None = the resume file, else a temporary one
    every: int = DEFAULT_CHECKPOINT_EVERY  # tokens between writes; 0 = never
    resume: str | None = None  # a checkpoint to continue

    def validate(self) -> None:
        if self.every < 0:
            raise UserError(f"--checkpoint-every {self.every}: must be 0 (never) or a token count")


@dataclass(frozen=True)
class OutputSettings:
    """What rank 0 prints for a one-prompt run."""
    json: bool = False
    stats: bool = False
    check_sync: bool = False


@dataclass(frozen=True)
class SpeculativeSettings:
    """Speculative decoding (engine/speculative.py): propose tokens cheaply, verify them
    in one sharded forward. Off unless a proposer is named."""
    draft_model: str | None = None  # small model with the target's tokenizer (rank 0 runs it)
    num_draft: int = 3  # tokens proposed per verify step
    prompt_lookup: int = 0  # longest n-gram matched against prompt + generated text; 0 = off

    @property
    def enabled(self) -> bool:
        return bool(self.draft_model) or self.prompt_lookup > 0

    def validate(self) -> None:
        if self.num_draft < 1:
            raise UserError(f"--num-draft {self.num_draft}: must be at least 1")
        if self.prompt_lookup < 0:
            raise UserError(f"--prompt-lookup {self.prompt_lookup}: must be 0 (off) or an n-gram length")
        if self.draft_model and self.prompt_lookup:
            raise UserError("--draft-model and --prompt-lookup: choose one proposer")


@dataclass(frozen=True)
class RankSettings:
    """Everything one rank of a job needs, besides the prompt and sampling."""
    model: ModelSettings = field(default_factory=ModelSettings)
    sharding: ShardingSettings = field(default_factory=ShardingSettings)
    kv: KVSettings = field(default_factory=KVSettings)
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    speculative: SpeculativeSettings = field(default_factory=SpeculativeSettings)

    def validate(self) -> None:
        self.model.validate()
        self.sharding.validate()
        self.speculative.validate()
        if self.sharding.pp > 1 and self.speculative.enabled:
            raise UserError(f"not implemented: speculative decoding with --pp {self.sharding.pp}; "
                            f"drop --prompt-lookup/--draft-model or --pp")
        self.liveness.validate()
        self.checkpoint.validate()


@dataclass(frozen=True)
class EngineSettings:
    """The serving engine's knobs (rank 0 schedules with them; every rank sizes its step
    message buffer from them, so they must be the same on every rank)."""
    max_batch: int = 16  # sequences decoding together
    max_waiting: int = 64  # admitted-later requests held in the queue; past it, submit refuses
    prefill_step: int = 512  # prompt tokens per engine step (the prefill budget), all requests together
    max_kv_tokens: int | None = None  # KV tokens one rank may hold; None = measured from free memory
    kv_memory_fraction: float = 0.8  # share of a rank's free memory (after loading) the KV cache may use
    prefix_cache_bytes: int = 256 << 20  # per rank, for cached prompt prefixes; 0 = off
    min_prefix_tokens: int = 16  # shorter shared prefixes are recomputed, not looked up
    prefix_block_tokens: int = 64  # tokens per prefix-cache block (see docs/engine.md for why 64)
    # the running rows' KV layout (kv/layout.py): length groups (each row about its own tokens), one padded
    # batch (rows x the longest), or auto (groups where the batch's layout is not another room's)
    kv_layout: str = "auto"
    prefix_cache_dir: str | None = None  # the disk tier: each rank keeps its blocks in DIR/rank<r> (None = off)
    prefix_cache_disk_bytes: int = 16 << 30  # the disk tier's size, counted at the largest rank's bytes
    # While rows decode, a step's prefill is cut to about this many decode steps' time (0 = always
    # prefill_step), so streaming requests slow down at most ~(1 + factor)x while a long prompt prefills.
    prefill_decode_ratio: float = 2.0
    min_prefill_chunk: int = 16
    check_sync: bool = False  # debug: after every removal, every rank reports its rows and KV; rank 0 compares
    # Speculative decoding by prompt lookup (0 = off): a batch of one row verifies up to num_draft proposals
    # per step; larger batches decode plainly. (A draft model runs in one-prompt generate only.)
    prompt_lookup: int = 0
    num_draft: int = 3

    @property
    def max_drafts(self) -> int:
        """Proposals a step message may carry (its buffer is sized for them on every rank)."""
        return self.num_draft if self.prompt_lookup > 0 else 0

    def validate(self) -> None:
        from .errors import UserError

        SpeculativeSettings(num_draft=self.num_draft, prompt_lookup=self.prompt_lookup).validate()

        for flag, value, low in (("--max-batch", self.max_batch, 1), ("--max-waiting", self.max_waiting, 0),
                                 ("--prefill-step", self.prefill_step, 1),
                                 ("--prefix-cache-bytes", self.prefix_cache_bytes, 0),
                                 ("--prefix-block-tokens", self.prefix_block_tokens, 1),
                                 ("--prefix-cache-disk-bytes", self.prefix_cache_disk_bytes, 0)):
            if value < low:
                raise UserError(f"{flag} {value}: must be at least {low}")
        if self.kv_layout not in ("auto", "groups", "padded"):
            raise UserError(f"--kv-layout {self.kv_layout}: choose auto, groups or padded")
        if self.prefill_decode_ratio < 0 or self.min_prefill_chunk < 1:
            raise UserError("prefill_decode_ratio must be >= 0 and min_prefill_chunk >= 1")
        if self.max_kv_tokens is not None and self.max_kv_tokens < 2:
            raise UserError(f"--max-kv-tokens {self.max_kv_tokens}: must be at least 2")
        if self.prefix_cache_dir is not None and not self.prefix_cache_bytes:
            raise UserError("--prefix-cache-dir needs the RAM prefix cache (blocks are read back into it): "
                            "give --prefix-cache-bytes > 0")


@dataclass(frozen=True)
class ServerSettings:
    """The OpenAI-compatible HTTP front on rank 0 (`mlx-kvshard serve`)."""
    host: str = "127.0.0.1"
    port: int = 8080
    model_id: str = "tiny"  # what /v1/models lists and requests name in "model"
    api_key: str | None = None  # Bearer token every endpoint but /health requires; None = open
    max_body_bytes: int = 4 << 20  # larger request bodies are refused with 413
    default_max_tokens: int = 512  # when a request gives neither max_tokens nor max_completion_tokens
    drain_s: float = 2.0  # when a rank is lost: how long open responses get to carry the error out

    def validate(self) -> None:
        from .errors import UserError

        if not 0 <= self.port < 65536:
            raise UserError(f"--port {self.port}: must be between 0 and 65535")
        if self.max_body_bytes < 1024:
            raise UserError(f"--max-body-bytes {self.max_body_bytes}: must be at least 1024")
        if self.default_max_tokens < 1:
            raise UserError(f"--max-tokens {self.default_max_tokens}: must be at least 1")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key is empty: give a key, or leave it out for an open server")
