"""Rank program for the KV tests. argv: OUT RUNS_JSON, where RUNS_JSON is a list of
{"name", "model", "bits", "group_size", "quant_start", "shard", "prefill_step", "tokens"}.
For each run: load this rank's shard with that KV layout, compute the prompt's last-token
logits (through the cache, in prefill chunks) and greedy tokens. Rank 0 writes
OUT/<name>.npz; every rank writes OUT/<name>.rank<R>.json with its KV facts."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from equiv_rank import PROMPT
from mlx_kvshard.config import ModelConfig
from mlx_kvshard.engine.dist import init_comm
from mlx_kvshard.engine.generate import DecodeTimings, SamplingParams, generate_tokens
from mlx_kvshard.engine.kvcache import allocated_positions, stored_positions
from mlx_kvshard.engine.loader import load_rank_model
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.settings import KVSettings


def last_logits(model, cache, prompt: list[int], step: int) -> mx.array:
    ids = mx.array(prompt)[None]
    for start in range(0, len(prompt), step):
        logits = model(ids[:, start:start + step], cache, last_only=True)
    return logits[0, -1]


def run(comm, out: Path, r: dict) -> None:
    d = Path(r["model"])
    kv = KVSettings(bits=r.get("bits"), group_size=r.get("group_size", 64),
                    quant_start=r.get("quant_start", 0), shard=r.get("shard", "replicate"),
                    rotate=r.get("rotate", False),  # mlx-lm, the oracle, stores K/V unrotated
                    fp_window=r.get("fp_window", 0))  # ... and every position quantized
    plan = ShardPlan.build(ModelConfig.from_file(d), comm.world, compute_dtype="float32", kv=kv, context=4096)
    model = load_rank_model(d, plan, comm, mx.float32)
    step = r.get("prefill_step", 512)
    logits = last_logits(model, model.make_cache(), PROMPT, step)
    mx.eval(logits)
    cache = model.make_cache()
    before = comm.stats.collectives
    tokens = list(generate_tokens(model, cache, PROMPT, SamplingParams(max_tokens=r["tokens"]), 4096,
                                  prefill_step=step, timings=DecodeTimings()))
    shard = plan.shards[comm.rank]
    seen = cache[0].offset
    facts = {
        "rank": comm.rank, "kv_heads": list(shard.kv_heads), "q_heads": list(shard.q_heads),
        "seq_sharers": shard.seq_sharers, "kv_shard": plan.kv.shard,
        "kv_bytes": sum(c.nbytes for c in cache),
        "kv_tokens": seen,
        "kv_positions": stored_positions(cache[0]),
        "kv_positions_allocated": allocated_positions(cache[0]),
        "plan_kv_positions": plan.kv_positions(comm.rank, seen),
        "plan_kv_bytes_per_position": plan.kv_bytes_per_token(comm.rank),
        "plan_kv_bytes": plan.kv_bytes(comm.rank, seen),
        "collectives": comm.stats.collectives - before,
    }
    (out / f"{r['name']}.rank{comm.rank}.json").write_text(json.dumps(facts))
    if comm.rank == 0:
        np.savez(out / f"{r['name']}.npz", logits=np.array(logits), tokens=np.array(tokens))


if __name__ == "__main__":
    comm = init_comm("ring")
    for spec in json.loads(sys.argv[2]):
        run(comm, Path(sys.argv[1]), spec)
