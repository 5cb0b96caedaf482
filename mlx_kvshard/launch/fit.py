"""Memory each rank needs (ShardPlan weights + KV cache for the context) against the
memory of the host it runs on. Pure Python: the launcher never loads weights."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..planner import capacity
from ..cli.plan import parse_weights
from ..config import ModelConfig
from ..errors import UserError
from ..plan import ShardPlan, human_bytes

GiB = 1 << 30
# The planner's allowance for MLX, Python, the tokenizer and activations (an estimate).
RUNTIME_BYTES = int(capacity.DEFAULT_OVERHEAD_GB * GiB)
DEFAULT_CONTEXT = 8192


@dataclass(frozen=True)
class ModelRequest:
    """What the rank command asks for, as far as memory is concerned."""

    model: str | None
    shares: list[float] | None  # --weights: each rank's share of the split
    dtype: str | None
    context: int | None  # --max-context


@dataclass(frozen=True)
class RankNeed:
    rank: int
    weight_bytes: int
    kv_bytes: int
    context: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + RUNTIME_BYTES

    def describe(self) -> str:
        return (f"{human_bytes(self.total)} (weights {human_bytes(self.weight_bytes)} + KV "
                f"{human_bytes(self.kv_bytes)} for {self.context} tokens + {human_bytes(RUNTIME_BYTES)} runtime)")


def request_from(ns: argparse.Namespace | None, model: str | None = None) -> ModelRequest:
    """What the rank command's parsed options (defaults included) ask for; `model`
    overrides (launch --check --model M without a rank command)."""
    get = (lambda k: getattr(ns, k, None)) if ns is not None else (lambda k: None)
    shares = parse_weights(get("weights"))
    dtype = None if get("dtype") in (None, "auto") else get("dtype")
    return ModelRequest(model or get("model"), shares, dtype, get("max_context"))


def context_for(cfg: ModelConfig, request: ModelRequest, override: int | None = None) -> int:
    if override:
        return override
    if request.context:
        return request.context
    return min(cfg.max_position_embeddings or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


def rank_needs(cfg: ModelConfig, world: int, request: ModelRequest, context: int) -> list[RankNeed]:
    plan = ShardPlan.build(cfg, world, request.shares, compute_dtype=request.dtype)
    return [RankNeed(r, plan.weight_bytes(r), plan.kv_bytes_per_token(r) * context, context) for r in range(world)]


def usable_bytes(memory_bytes: float) -> int:
    """What macOS lets the GPU wire by default: the planner's rule (capacity.USABLE_RULE)."""
    return int(memory_bytes * capacity.usable_fraction(memory_bytes / GiB))


def usable_share(memory_bytes: float) -> str:
    return f"{capacity.usable_fraction(memory_bytes / GiB):.0%}"


def check_enough_hosts(labels: list[str], memory_gb: list[float | None], cfg: ModelConfig,
                       request: ModelRequest, context: int) -> None:
    """With every host's memory_gb declared, refuse a cluster too small for the model
    before anything starts, and say how many hosts like these it would take."""
    if not labels or any(m is None for m in memory_gb):
        return
    world = len(labels)
    needs = rank_needs(cfg, world, request, context)
    short = [(n, labels[n.rank], usable_bytes(memory_gb[n.rank] * GiB)) for n in needs
             if n.total > usable_bytes(memory_gb[n.rank] * GiB)]
    if not short:
        return
    need, label, usable = max(short, key=lambda s: s[0].total - s[2])
    smallest = min(m for m in memory_gb if m is not None)
    more = _hosts_needed(cfg, request, context, smallest, world)
    hint = (f"with hosts like these it needs at least {more}" if more else
            "it does not fit on any number of hosts like these; use a smaller or quantized model")
    raise UserError(
        f"too few hosts for the model: rank {need.rank} ({label}) needs {need.describe()} but has "
        f"{human_bytes(usable)} usable ({usable_share(memory_gb[need.rank] * GiB)} of "
        f"{memory_gb[need.rank]:g} GB); {hint}, "
        f"or lower --max-context")


def _hosts_needed(cfg: ModelConfig, request: ModelRequest, context: int, memory_gb: float, world: int) -> int | None:
    usable = usable_bytes(memory_gb * GiB)
    even = ModelRequest(request.model, None, request.dtype, request.context)
    for k in range(world + 1, cfg.num_attention_heads + 1):
        try:
            needs = rank_needs(cfg, k, even, context)
        except UserError:
            continue
        if max(n.total for n in needs) <= usable:
            return k
    return None
