"""Rank program for the equivalence tests: for each checkpoint, load this rank's shard,
compute the prompt's last-token logits and 32 greedy tokens, and check the rank holds
exactly its own heads. Rank 0 writes <out>/<name>.npz; every rank writes its shard facts
to <out>/<name>.rank<R>.json."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_kvshard.config import ModelConfig
from mlx_kvshard.engine.dist import init_comm
from mlx_kvshard.engine.generate import DecodeTimings, SamplingParams, generate_tokens
from mlx_kvshard.engine.loader import load_rank_model, parameter_bytes
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.models.gguf.modeldir import open_checkpoint

PROMPT = [5, 17, 42, 99, 3, 250, 11, 7, 64, 128, 33, 2]
N_TOKENS = 32


def main(out: Path, model_dirs: list[str], vocab_parallel: bool) -> None:
    comm = init_comm("ring")
    for d in map(Path, model_dirs):
        cfg = ModelConfig.from_file(d)
        plan = ShardPlan.build(cfg, comm.world, compute_dtype="float32", vocab_parallel=vocab_parallel)
        model = load_rank_model(d, plan, comm, mx.float32)
        cache = model.make_cache()
        logits = model(mx.array(PROMPT)[None], cache)[0, -1]
        mx.eval(logits)
        cache = model.make_cache()
        tokens = list(generate_tokens(model, cache, PROMPT, SamplingParams(max_tokens=N_TOKENS), 4096,
                                      timings=DecodeTimings()))
        shard = plan.shards[comm.rank]
        hd = cfg.head_dim
        ckpt = open_checkpoint(d)
        k_proj = "model.layers.0.self_attn.k_proj.weight"
        own_rows = slice(shard.kv_heads[0] * hd, shard.kv_heads[1] * hd)
        mine = np.array(model.layers[0].self_attn.k_proj.weight.astype(mx.float32))
        want = np.array(ckpt.read(k_proj).astype(mx.float32))[own_rows]
        facts = {
            "rank": comm.rank,
            "kv_heads": list(shard.kv_heads),
            "k_proj_rows": int(mine.shape[0]),
            "k_proj_is_own_heads": bool(np.array_equal(mine, want)),
            "kv_bytes": sum(c.nbytes for c in cache),
            "kv_tokens_allocated": int(cache[0].keys.shape[2]),
            "plan_kv_bytes_per_token": plan.kv_bytes_per_token(comm.rank),
            "cache_kv_heads": int(cache[0].keys.shape[1]),
            "param_bytes": parameter_bytes(model),
            "plan_weight_bytes": plan.weight_bytes(comm.rank),
        }
        (out / f"{d.name}.rank{comm.rank}.json").write_text(json.dumps(facts))
        if comm.rank == 0:
            np.savez(out / f"{d.name}.npz", logits=np.array(logits), tokens=np.array(tokens))


if __name__ == "__main__":
    vp = "--vocab-parallel" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--vocab-parallel"]
    main(Path(args[0]), args[1:], vp)
