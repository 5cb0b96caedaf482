"""Every rank's entry into the engine: start the rank, measure how many KV tokens it can
hold, then rank 0 runs the `Engine` (and the caller's front: the batch CLI, the HTTP
server) while every other rank follows the step messages until told to stop."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..kv.admission import resolve_layout
from ..plan import kv_window_extra_bytes
from ..settings import EngineSettings, RankSettings
from . import wire
from .batch import BatchState


def free_memory_bytes() -> int:
    """Memory this rank can still use: Metal's recommended working set less what MLX holds
    (macOS), else the kernel's MemAvailable (Linux)."""
    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        limit = int(info.get("max_recommended_working_set_size", 0))
        return max(0, limit - mx.get_active_memory())
    from ..launch.probe import meminfo

    return meminfo("MemAvailable") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_capacity(loaded, settings: EngineSettings) -> tuple[int, list[dict]]:
    """Every rank measures what it can hold (one gather, at start); the engine admits by the
    smallest. --max-kv-tokens overrides the measurement."""
    from ..engine.dist import gather_json

    rank = loaded.comm.rank
    free = free_memory_bytes()
    per_token = loaded.kv_bytes_per_token(rank)
    usable = int(free * settings.kv_memory_fraction) - settings.prefix_cache_bytes
    # --kv-fp-window: each row's window positions cost full precision; reserve that for every row
    usable -= settings.max_batch * kv_window_extra_bytes(loaded.plan.kv, per_token, loaded.plan.compute_dtype)
    positions = max(0, usable // max(1, per_token))
    # tokens of sequences: with sequence-sharded KV this rank holds only its share of each
    tokens = positions if loaded.stages is not None else loaded.plan.admission_tokens(rank, positions,
                                                                                     settings.max_batch)
    mine = {"rank": rank, "free_bytes": free, "kv_bytes_per_token": per_token, "kv_positions": positions,
            "kv_tokens": tokens}
    ranks = gather_json(loaded.comm, mine)
    measured = min(r["kv_tokens"] for r in ranks)
    return (settings.max_kv_tokens or measured), ranks


def check_batchable(loaded) -> None:
    """Batched rows sit at different positions: the model's RoPE must take one offset per
    row (mlx-lm's default, llama3 and su/longrope do; a few scaled variants take an int only)."""
    rope = loaded.model.layers[0].self_attn.rope
    try:
        mx.eval(rope(mx.zeros((2, 1, 1, loaded.cfg.head_dim)), offset=mx.array([0, 3])))
    except Exception as e:
        raise UserError(f"this model's RoPE ({type(rope).__name__}) takes no per-sequence offsets, which the "
                        f"batched engine needs ({type(e).__name__}: {e}); use the one-prompt generate") from None


def check_kv(loaded, engine: EngineSettings) -> None:
    """Quantized KV (from the first token or from --kv-quant-start) and sequence-sharded KV
    are batched, but not late quantization of sequence-sharded heads; the prefix cache's disk
    tier stores whole-head blocks of one form only (not late-quantized or windowed ones). Decided from the plan and settings every rank
    shares, so every rank refuses alike."""
    kv = loaded.plan.kv
    if loaded.stages is None and loaded.plan.sequence_sharded and engine.prefix_cache_dir is not None:
        raise UserError(f"--prefix-cache-dir with sequence-sharded KV (--kv-shard {kv.shard}) is not implemented: "
                        f"drop --prefix-cache-dir (the RAM prefix cache works), or use --kv-shard replicate")
    if engine.prefix_cache_dir is not None and (kv.late or kv.window):
        what = (f"--kv-quant-start {kv.quant_start}" if kv.quant_start else
                f"the full-precision window of {kv.bits}-bit KV (--kv-fp-window {kv.window})")
        raise UserError(f"--prefix-cache-dir with {what} is not implemented (a block file holds one KV form): drop "
                        f"--prefix-cache-dir (the RAM prefix cache works)" + (", or add --kv-fp-window 0" if kv.window else ""))
    if kv.late and loaded.stages is None and loaded.plan.sequence_sharded:
        raise UserError(f"--kv-quant-start {kv.quant_start} with sequence-sharded KV (--kv-shard {kv.shard}) is not "
                        f"implemented in the serving engine (--prompts-file, serve); use one-prompt generate, or "
                        f"--kv-shard replicate")


def serve_rank(settings: RankSettings, engine_settings: EngineSettings, front: Callable) -> int:
    """Run this rank of the engine. On rank 0, `front(engine)` runs with the engine ready:
    it must call `engine.run()` on this (the main) thread, and `engine.shutdown()` from
    another when done; its return value is the exit code."""
    from ..engine.startup import start_rank
    from ..liveness.client import for_rank

    engine_settings.validate()
    with for_rank(settings.liveness) as live:
        loaded = start_rank(settings, live)
        if loaded.comm.world > 1 and not live.coordinator:
            raise UserError("the serving engine at world > 1 needs the liveness coordinator, to park idle ranks "
                            "off the ring: start it with --simulate N or `mlx-kvshard launch`, not plain mlx.launch")
        check_batchable(loaded)  # deterministic: every rank reaches the same verdict
        check_kv(loaded, engine_settings)
        layout = resolve_layout(engine_settings.kv_layout, loaded.stages is not None, loaded.plan.sequence_sharded)
        engine_settings = dataclasses.replace(engine_settings, kv_layout=layout)  # rank 0's scheduler admits by it
        capacity, ranks = kv_capacity(loaded, engine_settings)
        sizes = dict(kv_capacity=capacity, max_batch=engine_settings.max_batch,
                     block_tokens=engine_settings.prefix_block_tokens, prefill_step=engine_settings.prefill_step,
                     layout=layout)
        if loaded.stages is not None:  # --pp: this rank is one pipeline stage
            from ..pipeline.batch import PipelineBatchState

            state = PipelineBatchState(loaded.model, loaded.comm, **sizes)
        else:
            state = BatchState(loaded.model, loaded.comm,
                               needs_logits=loaded.comm.rank == 0 or loaded.plan.vocab_parallel, **sizes)
        if engine_settings.prefix_cache_dir is not None:  # every rank alike (one gather decides); not with --pp
            from ..kv.disk import open_tier

            state.disk = open_tier(loaded, engine_settings)
        live.phase("idle")
        if loaded.comm.rank == 0:
            from .engine import Engine

            engine = Engine(loaded, live, engine_settings, capacity, state, ranks)
            # The operator asked the launcher to stop: open requests are cancelled, the ranks told STOP.
            live.on_shutdown = lambda _why: engine.shutdown(cancel=True)  # the front may say more (server/run.py)
            return int(front(engine) or 0)
        # A stop on request reaches rank 0 too, which ends us with STOP in order: leaving now
        # would make its last broadcast fail on a closed connection.
        live.on_shutdown = lambda _why: None
        follow(loaded.comm, live, state, wire.engine_capacity(engine_settings))
        if state.disk is not None:
            state.disk.close()  # the queued block writes reach the disk before the process ends
        return 0


def follow(comm, live, state: BatchState, size: int) -> None:
    """A rank other than 0: execute rank 0's step messages until STOP; park on IDLE."""
    zeros = mx.zeros(size, dtype=mx.int32)
    while True:
        step = wire.decode(np.array(comm.all_sum(zeros)))
        if step.stop:
            return
        if step.idle:
            live.phase("idle")
            live.wait_wake()  # blocks on a socket-fed event: no CPU until rank 0 has work
            continue
        state.apply(step)
        live.progress(step.index + 1)
