"""The launcher's side of the memory rule. The rule itself is the planner's
(planner/capacity.py: weights + KV for the context + runtime overhead, against what macOS
lets the GPU wire), so `plan` and the doctor always agree; here is only what a launch
adds: the rank command's request, its default context, and a refusal before anything
starts. Pure Python: the launcher never loads weights."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import UserError
from ..plan import ShardPlan, human_bytes
from ..planner import capacity

DEFAULT_CONTEXT = 8192


@dataclass(frozen=True)
class ModelRequest:
    """What the rank command asks for, as far as memory is concerned."""

    model: str | None
    shares: list[float] | None  # --weights: each rank's share of the split (None: even)
    dtype: str | None
    context: int | None  # --max-context
    vocab_parallel: bool = False
    pp: int = 1  # --pp S: pipeline stages, one per rank (each holds its layers whole)


def context_for(cfg: ModelConfig, request: ModelRequest, override: int | None = None) -> int:
    if override:
        return override
    if request.context:
        return request.context
    return min(cfg.max_position_embeddings or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


def options_for(request: ModelRequest, context: int) -> capacity.Options:
    return capacity.Options(context=context, vocab_parallel=request.vocab_parallel)


def rank_needs(cfg: ModelConfig, world: int, request: ModelRequest, context: int) -> list[capacity.RankNeed]:
    if request.pp > 1:  # a stage holds its layers' weights and KV (pipeline/stages.py)
        from ..pipeline.stages import StagePlan, check_world

        check_world(request.pp, world)
        stages = StagePlan.build(cfg, world, request.shares, request.dtype, context=context)
        overhead = int(options_for(request, context).overhead_gb * capacity.GIB)
        return [capacity.RankNeed(s, stages.weight_bytes(s), stages.kv_bytes(s, context), overhead, context)
                for s in range(world)]
    plan = ShardPlan.build(cfg, world, request.shares, compute_dtype=request.dtype,
                           vocab_parallel=request.vocab_parallel)
    return capacity.rank_needs(plan, options_for(request, context))


def usable(memory_bytes: float) -> tuple[int, str]:
    """Bytes macOS lets the GPU wire out of `memory_bytes`, and that share as text ("67%")."""
    gb = memory_bytes / capacity.GIB
    return capacity.usable_bytes(capacity.Host("", gb)), f"{capacity.usable_fraction(gb):.0%}"


def check_enough_hosts(labels: list[str], memory_gb: list[float | None], cfg: ModelConfig,
                       request: ModelRequest, context: int) -> None:
    """With every host's memory_gb declared, refuse a cluster too small for the model
    before anything starts, and say how many hosts like these it would take."""
    if not labels or any(m is None for m in memory_gb):
        return
    world = len(labels)
    if request.pp > 1:
        for label, mem, need in zip(labels, memory_gb, rank_needs(cfg, world, request, context)):
            limit, share = usable(mem * capacity.GIB)
            if need.total > limit:
                raise UserError(f"--pp {request.pp}: stage {need.rank} ({label}) needs {need.describe()} but has "
                                f"{human_bytes(limit)} usable ({share} of {mem:g} GB); give it a smaller share with "
                                f"--shares, add Macs, or lower --max-context")
        return
    hosts = [capacity.Host(label, mem) for label, mem in zip(labels, memory_gb)]
    opts = options_for(request, context)
    shares = request.shares or [1.0] * world  # what the ranks will run with, not the planner's memory default
    fits = capacity.evaluate(cfg, hosts, None, opts, shares=shares, compute_dtype=request.dtype).fits
    short = [f for f in fits if not f.fits]
    if not short:
        return
    worst = min(short, key=lambda f: f.headroom_bytes)
    smallest = min(hosts, key=lambda h: h.memory_gb)
    more = capacity.macs_needed(cfg, smallest, opts, request.dtype, start=world + 1)
    hint = (f"with hosts like these it needs at least {more}" if more else
            "it does not fit on any number of hosts like these; use a smaller or quantized model")
    _, share = usable(worst.host.memory_gb * capacity.GIB)
    raise UserError(
        f"too few hosts for the model: rank {worst.rank} ({worst.host.name}) needs {worst.need.describe()} but "
        f"has {human_bytes(worst.usable_bytes)} usable ({share} of {worst.host.memory_gb:g} GB); {hint}, "
        f"or lower --max-context")
