"""Capacity planner: does a model fit on these Macs, how long a context, how fast, and
is a cluster worth it over one Mac. Pure Python (no MLX): reads shapes, never weights.

Decode is memory-bandwidth bound, so one token costs

    t_token ≈ max_rank (W_rank + KV_rank) / (η · mem_bw_rank) + 2 · L · t_allreduce(bytes) + t_fixed

where W_rank and KV_rank are the bytes a rank reads per step. Head-sharded tensor
parallelism issues 2 all_sums per layer (after o_proj and after down_proj) of one
hidden-size activation per sequence: their size does not grow with the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from ..config import DTYPE_BYTES, ModelConfig
from ..errors import UserError
from ..plan import ShardPlan, human_bytes, kv_position_bytes, kv_window_extra_bytes
from ..settings import KVSettings
from ..hardware.links import allgather_seconds, allreduce_seconds
from ..hardware.profiles import ChipProfile, LinkProfile

GIB = 1024**3

# macOS lets the GPU wire only part of unified memory (Metal's recommendedMaxWorkingSetSize):
# about 2/3 of RAM on Macs with up to 36 GB (16 GB M4 -> 10.67 GB,
# https://github.com/exo-explore/exo/pull/1672) and 3/4 above (64 GB -> ~48 GB, 128 GB -> ~96 GB,
# https://stencel.io/posts/apple-silicon-limitations-with-usage-on-local-llm%20.html). macOS 26 was
# measured higher on 128 GB (107.5 GiB, https://github.com/antirez/ds4/pull/893); we stay with the
# conservative rule. `sudo sysctl iogpu.wired_limit_mb=N` raises it; pass --usable-fraction then.
SMALL_MAC_MAX_GB = 36
USABLE_FRACTION_SMALL = 2 / 3
USABLE_FRACTION_LARGE = 3 / 4
USABLE_RULE = ("usable = 2/3 of RAM on Macs with up to 36 GB, 3/4 above (macOS default GPU wired limit, "
               "recommendedMaxWorkingSetSize; raise with sysctl iogpu.wired_limit_mb and --usable-fraction); "
               "Apple's GB of RAM are GiB")

# Estimates, not measurements: MLX/Metal runtime, command buffers, prefill activations per rank;
# the achievable fraction of spec memory bandwidth in decode; per-token Python/sampling overhead.
DEFAULT_OVERHEAD_GB = 1.0
DEFAULT_ETA = 0.7
DEFAULT_T_FIXED_S = 1e-3

# mlx-lm's QuantizedKVCache groups head_dim in 64s, each group with a scale and a bias.
KV_QUANT_GROUP = 64
KV_BITS = (16, 8, 4)


@dataclass(frozen=True)
class Host:
    name: str
    memory_gb: float | None = None  # Apple's "GB" of RAM, which are GiB
    chip: ChipProfile | None = None


@dataclass(frozen=True)
class Options:
    context: int = 8192
    batch: int = 1
    kv_bits: int = 16
    overhead_gb: float = DEFAULT_OVERHEAD_GB
    usable_fraction: float | None = None  # None: the macOS rule above
    eta: float = DEFAULT_ETA
    t_fixed_s: float = DEFAULT_T_FIXED_S
    vocab_parallel: bool = False
    spec_accept: float | None = None  # speculative decoding: per-token acceptance rate; None = off
    num_draft: int = 3  # tokens proposed per verify step
    draft_gb: float = 0.0  # draft model weights rank 0 reads per drafted token (0: prompt lookup)
    kv_shard: str = "replicate"  # world > n_kv_heads: replicate, sequence, or auto (less memory)
    kv_group_size: int = KV_QUANT_GROUP

    @property
    def kv(self) -> KVSettings:
        return KVSettings(bits=None if self.kv_bits == 16 else self.kv_bits, group_size=self.kv_group_size,
                          shard=self.kv_shard)

    def check(self) -> None:
        if self.context < 1 or self.batch < 1:
            raise UserError(f"--context and --batch must be at least 1, got {self.context} and {self.batch}")
        if self.kv_bits not in KV_BITS:
            raise UserError(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))}, got {self.kv_bits}")
        if self.overhead_gb < 0 or self.t_fixed_s < 0:
            raise UserError(f"--overhead-gb and --t-fixed-ms must not be negative, got "
                            f"{self.overhead_gb} and {self.t_fixed_s * 1e3}")
        if not 0 < self.eta <= 1:
            raise UserError(f"--eta is a fraction of memory bandwidth in (0, 1], got {self.eta}")
        if self.usable_fraction is not None and not 0 < self.usable_fraction <= 1:
            raise UserError(f"--usable-fraction must be in (0, 1], got {self.usable_fraction}")
        if self.spec_accept is not None and not 0 <= self.spec_accept < 1:
            raise UserError(f"--spec-accept is a per-token acceptance rate in [0, 1), got {self.spec_accept}")
        if self.num_draft < 1 or self.draft_gb < 0:
            raise UserError(f"--num-draft must be at least 1 and --draft-gb not negative, got "
                            f"{self.num_draft} and {self.draft_gb}")


# ---- memory ---------------------------------------------------------------------------
def usable_fraction(memory_gb: float) -> float:
    return USABLE_FRACTION_SMALL if memory_gb <= SMALL_MAC_MAX_GB else USABLE_FRACTION_LARGE


def usable_bytes(host: Host, fraction: float | None = None) -> int | None:
    if host.memory_gb is None:
        return None
    return int(host.memory_gb * GIB * (fraction if fraction is not None else usable_fraction(host.memory_gb)))


def _dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype, 2)


def kv_bytes_per_token_for(cfg: ModelConfig, kv_heads: int, kv_bits: int, dtype: str,
                           group_size: int = KV_QUANT_GROUP) -> int:
    """Bytes of K and V that one sequence adds per token for `kv_heads` heads, all layers."""
    return kv_position_bytes(cfg, kv_heads, None if kv_bits == 16 else kv_bits, group_size, dtype)


def kv_bytes_per_token(plan: ShardPlan, rank: int, kv_bits: int | None = None) -> int:
    """Per position the rank holds; `kv_bits` overrides the plan's (16 = the compute dtype)."""
    if kv_bits is None:
        return plan.kv_bytes_per_token(rank)
    return kv_bytes_per_token_for(plan.config, plan.shards[rank].local_kv_heads, kv_bits, plan.compute_dtype,
                                  plan.kv.group_size)


def kv_bytes(plan: ShardPlan, rank: int, context: int, batch: int = 1, kv_bits: int | None = None) -> int:
    """KV of `batch` sequences of `context` tokens, a full-precision window (--kv-fp-window, or
    the bit width's default) included."""
    if kv_bits is None:
        return plan.kv_bytes(rank, context, batch)
    kv = replace(plan.kv, bits=None if kv_bits == 16 else kv_bits)
    per_token, positions = kv_bytes_per_token(plan, rank, kv_bits), plan.kv_positions(rank, context)
    window = kv_window_extra_bytes(kv, per_token, plan.compute_dtype) * min(positions, kv.window) // max(1, kv.window)
    return batch * (positions * per_token + window)


def weight_bytes_read_per_token(plan: ShardPlan, rank: int) -> int:
    """Weights a decode step reads (an embedding lookup reads B rows, not the table)."""
    return plan.decode_read_bytes(rank)


@dataclass(frozen=True)
class RankNeed:
    """Memory one rank needs: the one rule, used by `plan` and by the launcher's doctor."""

    rank: int
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    context: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    def describe(self) -> str:
        return (f"{human_bytes(self.total)} (weights {human_bytes(self.weight_bytes)} + KV "
                f"{human_bytes(self.kv_bytes)} for {self.context} tokens + {human_bytes(self.overhead_bytes)} runtime)")


def rank_needs(plan: ShardPlan, opts: Options) -> list[RankNeed]:
    overhead = int(opts.overhead_gb * GIB)
    return [RankNeed(r, plan.weight_bytes(r), kv_bytes(plan, r, opts.context, opts.batch, opts.kv_bits), overhead,
                     opts.context) for r in range(plan.world)]


@dataclass
class RankFit:
    rank: int
    host: Host
    weight_bytes: int
    kv_bytes: int
    usable_bytes: int | None
    overhead_bytes: int
    headroom_bytes: int | None  # usable - overhead - weights - KV
    max_context: int | None  # largest context this rank holds at the batch size
    need: RankNeed | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.headroom_bytes is None else self.headroom_bytes >= 0


def fit_ranks(plan: ShardPlan, hosts: Sequence[Host], opts: Options) -> list[RankFit]:
    if len(hosts) != plan.world:
        raise UserError(f"got {len(hosts)} hosts for a world of {plan.world}")
    fits = []
    for need, host in zip(rank_needs(plan, opts), hosts):
        r = need.rank
        usable = usable_bytes(host, opts.usable_fraction)
        headroom = max_ctx = None
        if usable is not None:
            headroom = usable - need.total
            max_ctx = plan.max_context(r, usable - need.overhead_bytes - need.weight_bytes, opts.batch)
        fits.append(RankFit(r, host, need.weight_bytes, need.kv_bytes, usable, need.overhead_bytes, headroom,
                            max_ctx, need))
    return fits


# ---- communication --------------------------------------------------------------------
def vocab_gather_bytes(plan: ShardPlan, batch: int) -> int:
    """Per-rank block of the vocab-parallel logits gather (padded to the largest slice); 0 if off."""
    if not plan.vocab_parallel:
        return 0
    cfg = plan.config
    return batch * max(s.local_vocab(cfg.vocab_size) for s in plan.shards) * _dtype_bytes(plan.compute_dtype)


def wire_factor(link: LinkProfile | None, world: int, nbytes: float) -> float:
    """Bytes each rank sends on the wire per byte of all_sum payload."""
    if world <= 1:
        return 0.0
    if link is not None and link.algorithm == "mesh" and nbytes <= link.mesh_max_bytes:
        return float(world - 1)
    return 2 * (world - 1) / world


def comm_per_token(plan: ShardPlan, opts: Options, link: LinkProfile | None = None) -> dict:
    """Per decode step: head-sharded TP (this runtime) vs a design that all-gathers the KV cache."""
    cfg, world = plan.config, plan.world
    layers = cfg.num_hidden_layers
    payload = opts.batch * cfg.hidden_size * _dtype_bytes(plan.compute_dtype)  # one all_sum
    n_allsum = 2 * layers if world > 1 else 0
    tp_payload = n_allsum * payload
    tp_wire = tp_payload * wire_factor(link, world, payload)
    # The rejected design: every token, each rank receives the other ranks' share of the KV cache.
    kv_total = opts.batch * opts.context * kv_bytes_per_token_for(
        cfg, cfg.num_key_value_heads, opts.kv_bits, plan.compute_dtype)
    kv_wire = kv_total * (world - 1) / world
    out = {
        "head_sharded": {
            "collectives_per_token": n_allsum,
            "collective": "all_sum",
            "payload_bytes_per_collective": payload,
            "payload_bytes_per_token": tp_payload,
            "wire_bytes_per_rank_per_token": tp_wire,
            "wire_rule": _wire_rule(link, world, payload),
            "depends_on_context": False,
        },
        "kv_allgather": {
            "collectives_per_token": layers if world > 1 else 0,
            "collective": "all_gather (K and V of one layer)",
            "wire_bytes_per_rank_per_token": kv_wire,
            "depends_on_context": True,
        },
        "ratio_kv_allgather_to_head_sharded": (kv_wire / tp_wire) if tp_wire else None,
    }
    gather = vocab_gather_bytes(plan, opts.batch)
    if gather:  # vocab-parallel lm_head: one all_gather of the logits per step
        hs = out["head_sharded"]
        hs["collectives_per_token"] += 1
        hs["vocab_gather_bytes_per_rank"] = gather
        hs["payload_bytes_per_token"] += gather
        hs["wire_bytes_per_rank_per_token"] += gather * (world - 1)
    if link is not None and world > 1:
        out["head_sharded"]["link_seconds_per_token"] = (n_allsum * allreduce_seconds(link, world, payload)
                                                         + allgather_seconds(link, world, gather) * bool(gather))
        # at best: the whole cache streams at link bandwidth (ring all_gather, ignoring latency)
        out["kv_allgather"]["link_seconds_per_token"] = kv_wire / link.bandwidth_Bps
    return out


def _wire_rule(link: LinkProfile | None, world: int, payload: int) -> str:
    if world <= 1:
        return "no collectives on one rank"
    if link is not None and link.algorithm == "mesh" and payload <= link.mesh_max_bytes:
        return f"mesh one-step all_sum: each rank sends its payload to each of {world - 1} peers"
    return f"ring all_sum: each rank sends 2(N-1)/N = {2 * (world - 1) / world:.2f}x the payload"


# ---- prediction -----------------------------------------------------------------------
def predict_decode(plan: ShardPlan, context: int, batch: int, link: LinkProfile | None,
                   chips: ChipProfile | Sequence[ChipProfile], eta: float = DEFAULT_ETA,
                   t_fixed: float = DEFAULT_T_FIXED_S, kv_bits: int = 16) -> dict:
    """Predicted decode time per token, with its breakdown (seconds; bytes are per rank)."""
    world = plan.world
    chips = [chips] * world if isinstance(chips, ChipProfile) else list(chips)
    if len(chips) != world:
        raise UserError(f"got {len(chips)} chip profiles for a world of {world}")
    if world > 1 and link is None:
        raise UserError(f"a world of {world} needs a link profile (--link)")
    per_rank = []
    for r, chip in enumerate(chips):
        read = weight_bytes_read_per_token(plan, r) + kv_bytes(plan, r, context, batch, kv_bits)
        per_rank.append({"rank": r, "chip": chip.name, "bytes_read": read,
                         "memory_seconds": read / (eta * chip.mem_bandwidth_Bps)})
    slowest = max(per_rank, key=lambda d: d["memory_seconds"])
    payload = batch * plan.config.hidden_size * _dtype_bytes(plan.compute_dtype)
    n_allsum = 2 * plan.config.num_hidden_layers if world > 1 else 0
    # sequence-sharded KV: one small LSE all_gather per layer (latency-bound: priced as an all_sum)
    n_allsum += plan.config.num_hidden_layers if plan.sequence_sharded else 0
    t_allreduce = allreduce_seconds(link, world, payload) if world > 1 else 0.0
    t_link = n_allsum * t_allreduce
    gather = vocab_gather_bytes(plan, batch)
    if gather:
        t_link += allgather_seconds(link, world, gather)
    t_token = slowest["memory_seconds"] + t_link + t_fixed
    return {
        "seconds_per_token": t_token,
        "tokens_per_second": 1.0 / t_token,  # per sequence
        "aggregate_tokens_per_second": batch / t_token,
        "memory_seconds": slowest["memory_seconds"],
        "limiting_rank": slowest["rank"],
        "link_seconds": t_link,
        "allreduce_seconds": t_allreduce,
        "collectives_per_token": n_allsum + bool(gather),
        "fixed_seconds": t_fixed,
        "eta": eta,
        "link": link.name if link is not None and world > 1 else None,
        "per_rank": per_rank,
    }


def expected_tokens_per_step(accept: float, num_draft: int) -> float:
    """Tokens one verify step yields when each draft is accepted with probability `accept`
    independently: 1 + a + a^2 + ... + a^k (the target's own token always comes)."""
    return sum(accept**i for i in range(num_draft + 1))


def predict_speculative(plan: ShardPlan, context: int, link: LinkProfile | None,
                        chips: ChipProfile | Sequence[ChipProfile], accept: float, num_draft: int,
                        draft_bytes: float = 0.0, eta: float = DEFAULT_ETA, t_fixed: float = DEFAULT_T_FIXED_S,
                        kv_bits: int = 16) -> dict:
    """Decode with speculation (batch 1): a verify step reads the weights and the KV cache
    once and runs the 2·L all_sums once, each carrying k+1 positions, for
    expected_tokens_per_step tokens; a draft model (draft_bytes read per drafted token on
    rank 0) adds its reads and one small all_sum sharing its proposals."""
    plain = predict_decode(plan, context, 1, link, chips, eta, t_fixed, kv_bits)
    world, positions = plan.world, num_draft + 1
    payload = positions * plan.config.hidden_size * _dtype_bytes(plan.compute_dtype)
    t_allreduce = allreduce_seconds(link, world, payload) if world > 1 else 0.0
    n_collectives = plain["collectives_per_token"] + (1 if draft_bytes and world > 1 else 0)
    t_link = (plain["collectives_per_token"] - bool(vocab_gather_bytes(plan, 1))) * t_allreduce
    if vocab_gather_bytes(plan, 1):
        t_link += allgather_seconds(link, world, vocab_gather_bytes(plan, positions))
    if draft_bytes and world > 1:
        t_link += allreduce_seconds(link, world, 4 * num_draft)
    chip0 = chips if isinstance(chips, ChipProfile) else chips[0]
    t_draft = num_draft * draft_bytes / (eta * chip0.mem_bandwidth_Bps)
    t_step = plain["memory_seconds"] + t_link + t_draft + t_fixed
    tokens = expected_tokens_per_step(accept, num_draft)
    return {
        "acceptance_rate": accept, "num_draft": num_draft, "tokens_per_step": tokens,
        "seconds_per_step": t_step, "tokens_per_second": tokens / t_step,
        "speedup": tokens / t_step * plain["seconds_per_token"],
        "memory_seconds": plain["memory_seconds"], "link_seconds": t_link, "draft_seconds": t_draft,
        "allreduce_seconds": t_allreduce, "collectives_per_step": n_collectives,
        "collectives_per_generated_token": n_collectives / tokens,
        "plain_tokens_per_second": plain["tokens_per_second"],
    }


# ---- whole evaluation and the single-Mac-or-cluster decision ----------------------------
@dataclass
class Evaluation:
    plan: ShardPlan
    hosts: list[Host]
    fits: list[RankFit]
    prediction: dict | None
    # world > n_kv_heads: both KV shard modes at this context (what `auto` chooses between)
    kv_modes: dict[str, dict] = field(default_factory=dict)
    kv_capacity: list = field(default_factory=list)  # KVModeCapacity per precision and shard mode

    @property
    def fits_all(self) -> bool | None:
        flags = [f.fits for f in self.fits]
        return None if None in flags else all(flags)

    @property
    def max_context(self) -> tuple[int, int] | None:
        """(largest context every rank holds, the rank that limits it)."""
        if any(f.max_context is None for f in self.fits):
            return None
        f = min(self.fits, key=lambda f: (f.max_context, f.rank))
        return f.max_context, f.rank


def memory_shares(hosts: Sequence[Host], opts: Options) -> list[float] | None:
    """ShardPlan shares from usable memory, so a 64 GB Mac takes more heads than a 24 GB one."""
    usable = [usable_bytes(h, opts.usable_fraction) for h in hosts]
    return None if None in usable else [u / GIB for u in usable]


def build_plan(cfg: ModelConfig, hosts: Sequence[Host], opts: Options, shares, compute_dtype) -> ShardPlan:
    return ShardPlan.build(cfg, len(hosts), shares if shares is not None else memory_shares(hosts, opts),
                           compute_dtype=compute_dtype, vocab_parallel=opts.vocab_parallel,
                           kv=opts.kv, context=opts.context * opts.batch)


def evaluate(cfg: ModelConfig, hosts: Sequence[Host], link: LinkProfile | None, opts: Options,
             shares: Sequence[float] | None = None, compute_dtype: str | None = None) -> Evaluation:
    hosts = list(hosts)
    plan = build_plan(cfg, hosts, opts, shares, compute_dtype)
    fits = fit_ranks(plan, hosts, opts)
    prediction = None
    if all(h.chip is not None for h in hosts) and (len(hosts) == 1 or link is not None):
        prediction = predict_decode(plan, opts.context, opts.batch, link, [h.chip for h in hosts],
                                    opts.eta, opts.t_fixed_s, opts.kv_bits)
        if opts.spec_accept is not None and opts.batch == 1:
            prediction["speculative"] = predict_speculative(
                plan, opts.context, link, [h.chip for h in hosts], opts.spec_accept, opts.num_draft,
                opts.draft_gb * GIB, opts.eta, opts.t_fixed_s, opts.kv_bits)
    ev = Evaluation(plan, hosts, fits, prediction)
    if len(hosts) > cfg.num_key_value_heads:
        ev.kv_modes = {m: _mode_summary(cfg, hosts, replace(opts, kv_shard=m), shares, compute_dtype)
                       for m in ("replicate", "sequence")}
    ev.kv_capacity = kv_mode_capacities(cfg, hosts, opts, shares, compute_dtype)
    return ev


def _mode_summary(cfg: ModelConfig, hosts: Sequence[Host], opts: Options, shares, compute_dtype) -> dict:
    """Fullest rank's weights and KV, and the largest context, in one KV shard mode."""
    try:
        plan = build_plan(cfg, hosts, opts, shares, compute_dtype)
    except UserError as e:  # e.g. replicate with more sharers than query heads
        return {"error": str(e)}
    fits = fit_ranks(plan, hosts, opts)
    known = all(f.max_context is not None for f in fits)
    return {"kv_bytes_max_rank": max(f.kv_bytes for f in fits),
            "weight_bytes_max_rank": max(f.weight_bytes for f in fits),
            "max_context": min(f.max_context for f in fits) if known else None}


def macs_needed(cfg: ModelConfig, host: Host, opts: Options, compute_dtype: str | None = None,
                limit: int = 64, start: int = 1) -> int | None:
    """How many Macs like `host` (at least `start`) hold the model at this context and batch
    (None: more than `limit`)."""
    for k in range(start, min(limit, cfg.num_attention_heads) + 1):
        try:
            ev = evaluate(cfg, [host] * k, None, opts, compute_dtype=compute_dtype)
        except UserError:  # this world size cannot be planned (quantization groups, MLP split)
            continue
        if ev.fits_all:
            return k
    return None


@dataclass
class Decision:
    choice: str  # "single", "cluster", "neither" or "unknown"
    reason: str
    single_host: Host | None = None
    single: Evaluation | None = None
    macs_needed: int | None = None

    @property
    def line(self) -> str:
        return f"{self.choice}: {self.reason}"


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _mem(h: Host) -> str:
    return f"{h.memory_gb:g} GB"


def decide(cfg: ModelConfig, cluster: Evaluation, link: LinkProfile | None, opts: Options,
           compute_dtype: str | None = None) -> Decision:
    """Single Mac (the largest one) or the cluster, for this model, context and batch."""
    hosts = cluster.hosts
    if any(h.memory_gb is None for h in hosts):
        return Decision("unknown", "give --memory, --chip with --memory, or a --hostfile with memory_gb "
                                   "to decide between one Mac and the cluster")
    best = max(hosts, key=lambda h: (usable_bytes(h, opts.usable_fraction),
                                     h.chip.mem_bandwidth_Bps if h.chip else 0))
    single = evaluate(cfg, [best], None, opts, compute_dtype=compute_dtype)
    need = single.fits[0].weight_bytes + single.fits[0].kv_bytes + single.fits[0].overhead_bytes
    usable = single.fits[0].usable_bytes
    needed = macs_needed(cfg, best, opts, compute_dtype)
    d = Decision("", "", best, single, needed)
    at = f"at context {opts.context}" + (f" x batch {opts.batch}" if opts.batch > 1 else "")
    needs = (f"the model needs {_gb(need)} {at} (weights {_gb(single.fits[0].weight_bytes)}, "
             f"KV {_gb(single.fits[0].kv_bytes)}, overhead {_gb(single.fits[0].overhead_bytes)})")
    like = f"{needed} Macs like {best.name} ({_mem(best)})" if needed else f"more than 64 Macs like {best.name}"
    if not single.fits_all and not cluster.fits_all:
        short = min(cluster.fits, key=lambda f: f.headroom_bytes)
        d.choice = "neither"
        d.reason = (f"{needs}; {best.name} has {_gb(usable)} usable and cluster rank {short.rank} "
                    f"({short.host.name}) is short by {_gb(-short.headroom_bytes)}; it takes {like}, "
                    f"or use --kv-bits 4, a 4-bit checkpoint, or a shorter --context")
    elif not single.fits_all:
        d.choice = "cluster"
        d.reason = f"{needs} and the largest Mac, {best.name} ({_mem(best)}), has {_gb(usable)} usable; it takes {like}"
    elif not cluster.fits_all:
        short = min(cluster.fits, key=lambda f: f.headroom_bytes)
        d.choice = "single"
        d.reason = (f"fits on {best.name} ({_mem(best)}) with {_gb(single.fits[0].headroom_bytes)} headroom; "
                    f"the cluster does not (rank {short.rank} short by {_gb(-short.headroom_bytes)}: "
                    f"weights and embeddings replicate on every rank)")
    elif len(hosts) == 1:
        d.choice = "single"
        d.reason = f"fits on {best.name} ({_mem(best)}) with {_gb(single.fits[0].headroom_bytes)} headroom"
    elif single.prediction is None or cluster.prediction is None:
        d.choice = "single"
        d.reason = (f"fits on {best.name} ({_mem(best)}) with {_gb(single.fits[0].headroom_bytes)} headroom; "
                    f"one Mac avoids the link (give --chip for a speed comparison)")
    else:
        s, c = single.prediction["tokens_per_second"], cluster.prediction["tokens_per_second"]
        if s >= c:
            d.choice = "single"
            d.reason = (f"fits on {best.name} ({_mem(best)}) and is {s / c:.2f}x as fast as the cluster "
                        f"({s:.1f} vs {c:.1f} tok/s: the link costs "
                        f"{cluster.prediction['link_seconds'] * 1e3:.1f} ms/token)")
        else:
            d.choice = "cluster"
            d.reason = (f"{c / s:.2f}x as fast as {best.name} alone ({c:.1f} vs {s:.1f} tok/s): "
                        f"{len(hosts)} Macs read their shares of weights and KV in parallel")
    return d


# ---- users x context per KV mode ---------------------------------------------------------
@dataclass(frozen=True)
class KVModeCapacity:
    """What the cluster holds with one KV layout: `users` sequences of --context tokens, and
    the longest context at --batch (None: memory unknown). `error`: the layout cannot be planned."""
    bits: int  # 16 = the compute dtype
    shard: str  # replicate or sequence
    kv_bytes_per_user: int = 0  # on the fullest rank, one sequence at --context
    users: int | None = None
    max_context: int | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return ("fp" if self.bits == 16 else f"{self.bits}-bit") + f", {self.shard}"

    def to_dict(self) -> dict:
        return {"kv_bits": self.bits, "kv_shard": self.shard, "kv_bytes_per_user": self.kv_bytes_per_user,
                "users": self.users, "max_context": self.max_context, "error": self.error}


def kv_mode_capacities(cfg: ModelConfig, hosts: Sequence[Host], opts: Options, shares=None,
                       compute_dtype: str | None = None) -> list[KVModeCapacity]:
    """Per KV precision (fp, 8, 4 bits) and shard mode (sequence only where ranks outnumber KV
    heads; else it is the replicated layout): users of --context and context at --batch."""
    shards = ("replicate", "sequence") if len(hosts) > cfg.num_key_value_heads else ("replicate",)
    out = []
    for bits in KV_BITS:
        for shard in shards:
            mode = replace(opts, kv_bits=bits, kv_shard=shard)
            try:
                plan = build_plan(cfg, hosts, mode, shares, compute_dtype)
            except UserError as e:  # e.g. replicate with more sharers than query heads
                out.append(KVModeCapacity(bits, shard, error=str(e)))
                continue
            fits = fit_ranks(plan, hosts, replace(mode, batch=1))
            per_user = [kv_bytes(plan, f.rank, opts.context, 1, bits) for f in fits]
            users = max_ctx = None
            if all(f.usable_bytes is not None for f in fits):
                free = [f.usable_bytes - f.overhead_bytes - f.weight_bytes for f in fits]
                users = max(0, min(b // u if u else 0 for b, u in zip(free, per_user)))
                max_ctx = min(plan.max_context(f.rank, b, opts.batch) for f, b in zip(fits, free))
            out.append(KVModeCapacity(bits, shard, max(per_user), users, max_ctx))
    return out


def recommend_kv_mode(modes: list[KVModeCapacity], batch: int) -> tuple[KVModeCapacity | None, str]:
    """The most precise layout that holds --batch users at --context (full precision, then 8,
    then 4 bits; replicated before sequence-sharded, which costs one more collective per
    layer); if none does, the one that holds the most users."""
    known = [m for m in modes if m.error is None and m.users is not None]
    if not known:
        return None, "give --memory (or a hostfile with memory_gb) to size the KV cache"
    for m in known:  # already in that order
        if m.users >= batch:
            why = "full precision" if m.bits == 16 else f"the most precise KV that holds {batch}"
            return m, f"holds {m.users} user(s) of the context ({why})"
    best = max(known, key=lambda m: (m.users, -m.bits))
    if best.users == 0:
        return None, "no KV layout holds one sequence of this context: lower --context or add Macs"
    return best, f"holds the most users ({best.users}), fewer than --batch {batch}"
