"""ShardPlan: what each rank owns. Pure Python (no MLX), so planning never loads weights.

A rank owns whole GQA groups (a KV head and its query heads) when the world is no
larger than the KV head count; beyond that, ranks share a KV head, in one of two modes:
"replicate" (each sharer keeps a replica of the head's cache and takes part of its query
heads) or "sequence" (each sharer keeps every s-th position of the head's cache and all
its query heads; partial attentions are merged by log-sum-exp). MLP columns are split so
that each rank's weight bytes plus its KV bytes at the planned context follow its weight
(memory), compensating uneven heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from .config import DTYPE_BYTES, ModelConfig
from .errors import UserError
from .settings import KVSettings


def split_counts(total: int, weights: Sequence[float], minimum: int = 1) -> list[int]:
    """Integers summing to `total`, proportional to `weights`, each at least `minimum`."""
    n = len(weights)
    if total < minimum * n:
        raise ValueError(f"cannot split {total} into {n} parts of at least {minimum}")
    s = float(sum(weights))
    ideal = [total * w / s for w in weights]
    counts = [max(minimum, math.floor(x)) for x in ideal]
    while sum(counts) < total:  # hand out the remainder to the largest shortfall
        i = max(range(n), key=lambda j: (ideal[j] - counts[j], -j))
        counts[i] += 1
    while sum(counts) > total:  # the minimum overshot: take from the largest surplus
        i = max((j for j in range(n) if counts[j] > minimum),
                key=lambda j: (counts[j] - ideal[j], j))
        counts[i] -= 1
    return counts


def contiguous_ranges(counts: Sequence[int], start: int = 0) -> list[tuple[int, int]]:
    out = []
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


@dataclass(frozen=True)
class RankShard:
    """One rank's slice of every layer. Ranges are [start, stop) in global indices."""

    rank: int
    kv_heads: tuple[int, int]
    q_heads: tuple[int, int]
    mlp_cols: tuple[int, int]
    kv_sharers: int = 1  # ranks holding a replica of these KV heads (>1 only when world > n_kv_heads)
    vocab_rows: tuple[int, int] | None = None  # lm_head rows, when vocab-parallel; None: all
    # Sequence-sharded KV: the sharers of this rank's KV head are ranks seq_first_rank ..
    # seq_first_rank + seq_sharers - 1; position p belongs to sharer seq_cycle[p % len(seq_cycle)]
    # (even shares: (0, 1, ..., s-1), i.e. p mod s; --shares weights how often each appears).
    seq_sharers: int = 1
    seq_index: int = 0
    seq_cycle: tuple[int, ...] = (0,)

    @property
    def seq_first_rank(self) -> int:
        return self.rank - self.seq_index

    @property
    def seq_slots(self) -> tuple[int, ...]:
        """The offsets within one cycle whose positions this rank holds, in order."""
        return tuple(k for k, owner in enumerate(self.seq_cycle) if owner == self.seq_index)

    def seq_owns(self, p: int) -> bool:
        return self.seq_cycle[p % len(self.seq_cycle)] == self.seq_index

    def seq_held(self, n: int) -> int:
        """How many of a sequence's first n positions this rank holds."""
        period, slots = len(self.seq_cycle), self.seq_slots
        return n // period * len(slots) + sum(1 for k in slots if k < n % period)

    def seq_position(self, j: int) -> int:
        """The absolute position of the j-th (from 0) position this rank holds."""
        slots = self.seq_slots
        return j // len(slots) * len(self.seq_cycle) + slots[j % len(slots)]

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def local_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def local_mlp_cols(self) -> int:
        return self.mlp_cols[1] - self.mlp_cols[0]

    def local_vocab(self, vocab_size: int) -> int:
        return vocab_size if self.vocab_rows is None else self.vocab_rows[1] - self.vocab_rows[0]


@dataclass
class ShardPlan:
    config: ModelConfig
    world: int
    shares: list[float]  # per-rank split shares (e.g. memory in GB); even = all 1.0
    shards: list[RankShard]
    # Element size of activations and KV cache (the run's compute dtype).
    compute_dtype: str = "float16"
    notes: list[str] = field(default_factory=list)
    # lm_head split by vocabulary rows (one all_gather of the logits per step) instead of
    # replicated: each rank stores and reads 1/N of it.
    vocab_parallel: bool = False
    kv: KVSettings = field(default_factory=KVSettings)  # shard mode resolved: never "auto"
    context: int = 0  # tokens per sequence whose KV the MLP split reserves room for (0: none)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def build(cls, config: ModelConfig, world: int, shares: Sequence[float] | None = None,
              compute_dtype: str | None = None, vocab_parallel: bool = False,
              kv: KVSettings | None = None, context: int | None = None) -> "ShardPlan":
        """`kv`: KV precision and shard mode; `context`: tokens per sequence to reserve KV for
        when balancing ranks (the runtime passes its max context)."""
        if world < 1:
            raise UserError(f"world size must be at least 1, got {world}")
        if shares is None:
            shares = [1.0] * world
        shares = [float(w) for w in shares]
        if len(shares) != world:
            raise UserError(f"got {len(shares)} rank shares for a world of {world}; give one per rank")
        if any(not w > 0 for w in shares):
            raise UserError(f"rank shares must all be positive, got {shares}")
        kv = kv or KVSettings()
        kv.check(config.head_dim)
        args = (config, world, shares, compute_dtype or config.dtype, vocab_parallel and world > 1,
                context or 0)
        if world <= config.num_key_value_heads or kv.shard != "auto":
            return cls._build_mode(*args, kv)
        # auto: whichever mode needs less memory on its fullest rank at the planned context
        if kv.fp_window:  # only replicated heads take a full-precision window
            return cls._build_mode(*args, replace(kv, shard="replicate"))
        plans = {m: cls._build_mode(*args, replace(kv, shard=m)) for m in ("replicate", "sequence")}
        need = {m: p.max_rank_bytes() for m, p in plans.items()}
        choice = "sequence" if need["sequence"] < need["replicate"] else "replicate"
        plans[choice].notes.append(
            f"--kv-shard auto chose {choice} at context {context or 0}: fullest rank needs "
            f"{human_bytes(need['replicate'])} (replicate) vs {human_bytes(need['sequence'])} (sequence)")
        return plans[choice]

    @classmethod
    def _build_mode(cls, config: ModelConfig, world: int, shares: list[float], compute_dtype: str,
                    vocab_parallel: bool, context: int, kv: KVSettings) -> "ShardPlan":
        n_kv, g = config.num_key_value_heads, config.group_size_q
        notes: list[str] = []
        if world <= n_kv:
            kv_counts = split_counts(n_kv, shares)
            kv_ranges = contiguous_ranges(kv_counts)
            shards = [RankShard(rank=r, kv_heads=(a, b), q_heads=(a * g, b * g), mlp_cols=(0, 0))
                      for r, (a, b) in enumerate(kv_ranges)]
            if n_kv % world:
                notes.append(f"{n_kv} KV heads do not divide by {world} ranks: uneven split {kv_counts}")
            if kv.shard == "sequence":
                notes.append(f"world {world} <= {n_kv} KV heads: no KV head is shared, so --kv-shard "
                             f"sequence has nothing to split; each rank holds whole heads")
            kv = replace(kv, shard="replicate")  # no head is shared: nothing to split by sequence
        elif kv.shard == "sequence":
            if kv.fp_window:
                raise UserError(f"--kv-fp-window {kv.fp_window} with sequence-sharded KV heads (world {world} > "
                                f"{n_kv} KV heads): not implemented; use --kv-shard replicate or --kv-fp-window 0")
            kv = replace(kv, fp_window=0)  # the default window yields: sequence-sharded heads take none
            shards = _sequence_kv_heads(config, world, shares)
            notes.append(
                f"world {world} > {n_kv} KV heads: each KV head's positions are interleaved across the "
                f"ranks that share it; each sharer holds all {g} of its query heads (one extra small "
                f"all_gather per layer merges the partial attentions)")
            for s in shards:
                if s.seq_index == 0 and len(s.seq_cycle) != s.seq_sharers:
                    held = [s.seq_cycle.count(i) for i in range(s.seq_sharers)]
                    notes.append(f"KV head {s.kv_heads[0]}: --shares split its positions "
                                 f"{':'.join(map(str, held))} over ranks {s.rank}-{s.rank + s.seq_sharers - 1}")
        else:
            shards = _share_kv_heads(config, world, shares)
            notes.append(
                f"world {world} > {n_kv} KV heads: KV heads are replicated on the ranks that "
                f"share them; each sharer computes part of that head's {g} query heads"
            )
        plan = cls(config, world, shares, shards, compute_dtype=compute_dtype, notes=notes,
                   vocab_parallel=vocab_parallel, kv=kv, context=context)
        plan._check_quant_alignment()
        mlp = plan._split_mlp()
        vocab = contiguous_ranges(split_counts(config.vocab_size, shares)) if vocab_parallel else [None] * world
        plan.shards = [replace(s, mlp_cols=mlp[s.rank], vocab_rows=vocab[s.rank]) for s in shards]
        return plan

    def _check_quant_alignment(self) -> None:
        hd = self.config.head_dim
        for q in self.config.quantized_modules("self_attn.o_proj"):
            for s in self.shards:
                # o_proj is split along its input (query-head) axis, which is quantized in groups.
                if (s.q_heads[0] * hd) % q.group_size:
                    raise UserError(
                        f"rank {s.rank} would start o_proj at column {s.q_heads[0] * hd}, not a multiple of "
                        f"the quantization group size {q.group_size} (head_dim {hd}); choose a world "
                        f"size that splits at whole groups, or use an unquantized checkpoint"
                    )

    def _split_mlp(self) -> list[tuple[int, int]]:
        cfg = self.config
        groups = [q.group_size for q in cfg.quantized_modules("mlp.down_proj")]
        if groups:
            align = math.lcm(*groups)  # down_proj's input axis is quantized in groups, in every layer
        else:  # whole SIMD-friendly blocks when the model is big enough for them
            align = 32 if cfg.intermediate_size % 32 == 0 and cfg.intermediate_size // 32 >= self.world else 1
        units = cfg.intermediate_size // align
        if units * align != cfg.intermediate_size:
            raise UserError(
                f"intermediate_size {cfg.intermediate_size} is not a multiple of the "
                f"quantization group size {align}"
            )
        if units < self.world:
            raise UserError(
                f"intermediate_size {cfg.intermediate_size} has only {units} column groups of "
                f"{align}; it cannot be split across {self.world} ranks"
            )
        # one unit of MLP columns (gate and up rows, down columns) and each rank's attention
        # weights plus the KV reserved at the planned context, over all layers
        h = cfg.hidden_size
        per_unit = sum(self._linear_bytes(align, h, f"{p}.gate_proj") + self._linear_bytes(align, h, f"{p}.up_proj")
                       + self._linear_bytes(h, align, f"{p}.down_proj") for p in self._layer_prefixes("mlp"))
        attn = [sum(self._attention_bytes(s, layer) for layer in range(cfg.num_hidden_layers))
                + self.kv_bytes(s.rank, self.context) for s in self.shards]
        budget = sum(attn) + units * per_unit
        wsum = sum(self.shares)
        # Each rank's share of all layer bytes follows its weight; MLP fills what attention leaves.
        want = [max(0.0, budget * w / wsum - a) / per_unit for w, a in zip(self.shares, attn)]
        if sum(want) <= 0:
            want = list(self.shares)
        counts = split_counts(units, want)
        return [(a * align, b * align) for a, b in contiguous_ranges(counts)]

    # ---- byte accounting ------------------------------------------------------------
    @property
    def _param_bytes(self) -> int:
        cfg = self.config
        return DTYPE_BYTES[cfg.dtype] if cfg.dtype in DTYPE_BYTES else 2

    def _linear_bytes(self, out_features: int, in_features: int, module: str) -> int:
        """Bytes of `module`'s matrix (out x in) as the checkpoint stores it (config.json's
        quantization: its defaults, or the module's own entry)."""
        q = self.config.quant_for(module)
        if q is None:
            return out_features * in_features * self._param_bytes
        return q.linear_bytes(out_features, in_features, self._param_bytes)

    def _layer_prefixes(self, block: str) -> list[str]:
        return [f"model.layers.{i}.{block}" for i in range(self.config.num_hidden_layers)]

    def _attention_bytes(self, s: RankShard, layer: int) -> int:
        cfg = self.config
        hd, h = cfg.head_dim, cfg.hidden_size
        p = f"model.layers.{layer}.self_attn"
        b = self._linear_bytes(s.local_q_heads * hd, h, f"{p}.q_proj")
        b += self._linear_bytes(s.local_kv_heads * hd, h, f"{p}.k_proj")
        b += self._linear_bytes(s.local_kv_heads * hd, h, f"{p}.v_proj")
        b += self._linear_bytes(h, s.local_q_heads * hd, f"{p}.o_proj")
        if cfg.attention_bias:
            b += (s.local_q_heads + 2 * s.local_kv_heads) * hd * self._param_bytes
        return b

    def layer_bytes(self, rank: int, layer: int = 0) -> int:
        """Bytes of one layer's slice on `rank` (layers differ when config.json quantizes them
        differently)."""
        s = self.shards[rank]
        cfg = self.config
        p = f"model.layers.{layer}.mlp"
        b = self._attention_bytes(s, layer)
        b += self._linear_bytes(s.local_mlp_cols, cfg.hidden_size, f"{p}.gate_proj")
        b += self._linear_bytes(s.local_mlp_cols, cfg.hidden_size, f"{p}.up_proj")
        b += self._linear_bytes(cfg.hidden_size, s.local_mlp_cols, f"{p}.down_proj")
        b += 2 * cfg.hidden_size * self._param_bytes  # two RMSNorms (replicated)
        if cfg.model_type == "qwen3":
            b += 2 * cfg.head_dim * self._param_bytes  # q_norm, k_norm
        return b

    def layers_bytes(self, rank: int) -> int:
        """Bytes of every layer's slice on `rank`."""
        return sum(self.layer_bytes(rank, layer) for layer in range(self.config.num_hidden_layers))

    def replicated_bytes(self) -> int:
        """Embedding and final norm: held whole on every rank."""
        cfg = self.config
        return (self._linear_bytes(cfg.vocab_size, cfg.hidden_size, "model.embed_tokens")
                + cfg.hidden_size * self._param_bytes)

    def logits_bytes(self, rank: int) -> int:
        """The vocabulary rows this rank multiplies for the logits (lm_head, or the tied embedding)."""
        cfg = self.config
        module = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
        return self._linear_bytes(self.shards[rank].local_vocab(cfg.vocab_size), cfg.hidden_size, module)

    def weight_bytes(self, rank: int) -> int:
        """Bytes this rank stores."""
        lm_head = 0 if self.config.tie_word_embeddings else self.logits_bytes(rank)
        return self.layers_bytes(rank) + self.replicated_bytes() + lm_head

    def decode_read_bytes(self, rank: int) -> int:
        """Weight bytes one decode step reads: every layer slice, the final norm and the
        logits rows; the embedding lookup reads a single row."""
        cfg = self.config
        return self.layers_bytes(rank) + cfg.hidden_size * self._param_bytes + self.logits_bytes(rank)

    def kv_bytes_per_token(self, rank: int) -> int:
        """KV bytes per position this rank holds (all layers, its heads, at the plan's KV bits)."""
        return kv_position_bytes(self.config, self.shards[rank].local_kv_heads, self.kv.bits,
                                 self.kv.group_size, self.compute_dtype)

    def kv_window_bytes(self, rank: int) -> int:
        """Bytes one sequence holds beyond positions x kv_bytes_per_token: its --kv-fp-window
        positions in the compute dtype instead of quantized (0 without a window)."""
        return kv_window_extra_bytes(self.kv, self.kv_bytes_per_token(rank), self.compute_dtype)

    def kv_positions(self, rank: int, context: int) -> int:
        """How many of a sequence's first `context` positions this rank holds."""
        return self.shards[rank].seq_held(max(0, context))

    def kv_bytes(self, rank: int, context: int, batch: int = 1) -> int:
        """KV bytes this rank holds for `batch` sequences of `context` tokens (before the
        cache's allocation granularity: mlx-lm caches grow 256 positions at a time)."""
        positions = self.kv_positions(rank, context)
        extra = self.kv_window_bytes(rank) * min(positions, self.kv.window) // max(1, self.kv.window)
        return batch * (positions * self.kv_bytes_per_token(rank) + extra)

    def max_context(self, rank: int, free_bytes: int, batch: int = 1) -> int:
        """The longest context whose KV fits in `free_bytes` on this rank."""
        if free_bytes <= 0:
            return 0
        positions = free_bytes // (batch * self.kv_bytes_per_token(rank))
        return self.shards[rank].seq_position(positions) if positions else 0

    def admission_tokens(self, rank: int, positions: int, rows: int) -> int:
        """Sequence tokens the serving engine may admit (rows x the longest reservation) so
        that this rank, holding `positions` KV positions, never overflows: its share of each
        of `rows` rows can exceed that row's exact fraction by up to one cycle's slots."""
        s = self.shards[rank]
        if s.seq_sharers == 1:
            return positions
        slots = len(s.seq_slots)
        return max(0, positions - rows * slots) * len(s.seq_cycle) // slots

    def max_rank_bytes(self) -> int:
        """Weights + KV at the planned context on the fullest rank."""
        return max(self.weight_bytes(r) + self.kv_bytes(r, self.context) for r in range(self.world))

    @property
    def sequence_sharded(self) -> bool:
        """Some KV head is split by position: attention issues one LSE all_gather per layer."""
        return any(s.seq_sharers > 1 for s in self.shards)

    def total_weight_bytes_unsharded(self) -> int:
        """Bytes of the whole model on one device (for ratios in summaries)."""
        return ShardPlan.build(self.config, 1, compute_dtype=self.compute_dtype).weight_bytes(0)

    # ---- presentation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        cfg = self.config
        return {
            "model_type": cfg.model_type,
            "world": self.world,
            "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size,
            "quantization": (vars(cfg.quantization) if cfg.quantization else None),
            "quantization_overrides": {m: (vars(q) if q else None) for m, q in cfg.quant_overrides},
            "compute_dtype": self.compute_dtype,
            "vocab_parallel": self.vocab_parallel,
            "kv": {"bits": self.kv.bits, "group_size": self.kv.group_size, "shard": self.kv.shard,
                   "context": self.context},
            "notes": list(self.notes),
            "ranks": [
                {
                    "rank": s.rank,
                    "weight": self.shares[s.rank],
                    "kv_heads": list(s.kv_heads),
                    "q_heads": list(s.q_heads),
                    "mlp_cols": list(s.mlp_cols),
                    "local_kv_heads": s.local_kv_heads,
                    "local_q_heads": s.local_q_heads,
                    "local_mlp_cols": s.local_mlp_cols,
                    "kv_sharers": s.kv_sharers,
                    "seq_sharers": s.seq_sharers,
                    "seq_index": s.seq_index,
                    "vocab_rows": list(s.vocab_rows) if s.vocab_rows else [0, cfg.vocab_size],
                    "weight_bytes": self.weight_bytes(s.rank),
                    "kv_bytes_per_1k_tokens": self.kv_bytes(s.rank, 1024),
                    "kv_bytes_per_position": self.kv_bytes_per_token(s.rank),
                    "kv_bytes_at_context": self.kv_bytes(s.rank, self.context),
                }
                for s in self.shards
            ],
        }

    def table(self) -> str:
        cfg = self.config
        head = (f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads, "
                f"MLP {cfg.intermediate_size}, world {self.world}")
        rows = [("rank", "KV heads", "query heads", "MLP columns", "weights", "KV / 1K tok")]
        for s in self.shards:
            kv = f"{s.kv_heads[0]}-{s.kv_heads[1] - 1}" + (f" (x{s.kv_sharers})" if s.kv_sharers > 1 else "")
            if s.seq_sharers > 1:
                kv += f" (pos {s.seq_index} mod {s.seq_sharers})"
            rows.append((
                str(s.rank), kv, f"{s.q_heads[0]}-{s.q_heads[1] - 1}",
                f"{s.mlp_cols[0]}-{s.mlp_cols[1] - 1}",
                human_bytes(self.weight_bytes(s.rank)),
                human_bytes(self.kv_bytes(s.rank, 1024)),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _sharers_per_head(config: ModelConfig, world: int) -> list[int]:
    return split_counts(world, [1.0] * config.num_key_value_heads)


def _share_kv_heads(config: ModelConfig, world: int, shares: list[float]) -> list[RankShard]:
    """world > n_kv_heads, replicate: every KV head gets one or more ranks, which split its query heads."""
    n_kv, g = config.num_key_value_heads, config.group_size_q
    sharers_per_head = _sharers_per_head(config, world)
    if max(sharers_per_head) > g:
        raise UserError(
            f"world {world} needs up to {max(sharers_per_head)} ranks per KV head, but each KV head "
            f"has only {g} query head(s) to split among them ({config.num_attention_heads} query / "
            f"{n_kv} KV heads); use a world of at most {config.num_attention_heads} ranks, "
            f"or --kv-shard sequence"
        )
    shards, rank = [], 0
    for head, s in enumerate(sharers_per_head):
        q_counts = split_counts(g, shares[rank:rank + s])
        for a, b in contiguous_ranges(q_counts, start=head * g):
            shards.append(RankShard(rank=rank, kv_heads=(head, head + 1), q_heads=(a, b), mlp_cols=(0, 0),
                                    kv_sharers=s))
            rank += 1
    return shards


def _sequence_kv_heads(config: ModelConfig, world: int, shares: list[float]) -> list[RankShard]:
    """world > n_kv_heads, sequence: each sharer of a KV head holds a share of its cache's
    positions, interleaved (so the shares grow evenly), weighted by --shares, and all its
    query heads."""
    g = config.group_size_q
    shards, rank = [], 0
    for head, s in enumerate(_sharers_per_head(config, world)):
        cycle = sequence_cycle(shares[rank:rank + s])
        for i in range(s):
            shards.append(RankShard(rank=rank, kv_heads=(head, head + 1), q_heads=(head * g, head * g + g),
                                    mlp_cols=(0, 0), seq_sharers=s, seq_index=i, seq_cycle=cycle))
            rank += 1
    return shards


MAX_SEQ_CYCLE = 64  # positions in one ownership cycle: --shares are matched to 1% within it


def sequence_cycle(weights: Sequence[float]) -> tuple[int, ...]:
    """Which sharer holds each position of one cycle, for sharers weighted by `weights`: the
    shortest cycle (at most MAX_SEQ_CYCLE) whose counts match the weights to 1%, in smooth
    weighted round-robin order (the shares interleave, none runs ahead). Even weights give
    (0, 1, ..., s-1): position p on sharer p mod s."""
    s, total = len(weights), float(sum(weights))
    best = None
    for period in range(s, MAX_SEQ_CYCLE + 1):
        counts = split_counts(period, weights)
        err = max(abs(c / period - w / total) for c, w in zip(counts, weights))
        if best is None or err < best[0] - 1e-12:
            best = (err, counts)
        if err <= 0.01:
            break
    counts = best[1]
    period, current, cycle = sum(counts), [0] * s, []
    for _ in range(period):
        current = [c + n for c, n in zip(current, counts)]
        i = max(range(s), key=lambda j: (current[j], -j))
        current[i] -= period
        cycle.append(i)
    return tuple(cycle)


def kv_position_bytes(cfg: ModelConfig, kv_heads: int, bits: int | None, group_size: int, dtype: str) -> int:
    """Bytes of K and V for one position of `kv_heads` heads, all layers: the compute dtype, or
    (quantized, as mlx-lm's QuantizedKVCache stores it) packed values plus one scale and one
    bias in the compute dtype per `group_size` elements."""
    elements = 2 * cfg.num_hidden_layers * kv_heads * cfg.head_dim
    per = DTYPE_BYTES.get(dtype, 2)
    if bits is None:
        return elements * per
    if cfg.head_dim % group_size:
        raise UserError(f"--kv-bits {bits}: head_dim {cfg.head_dim} is not a multiple of the KV "
                        f"quantization group {group_size}; use another --kv-group-size or full precision")
    return elements * bits // 8 + elements // group_size * 2 * per


def kv_window_extra_bytes(kv, per_token: int, dtype: str) -> int:
    """What a full window of kv.window positions costs beyond those positions quantized, given
    the quantized bytes per position `per_token` (any heads and layers: the ratio is fixed by
    the bit width, group size and compute dtype)."""
    if not kv.window or kv.bits is None:
        return 0
    per = DTYPE_BYTES.get(dtype, 2)
    elements = per_token * 8 * kv.group_size // (kv.bits * kv.group_size + 16 * per)  # K and V elements per position
    return kv.window * (elements * per - per_token)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
