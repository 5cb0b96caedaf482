"""Quantized-KV quality as a benchmark rank: for full precision, 8-bit and 4-bit KV on this
world, N greedy tokens (free-running), and the logits along the full-precision run's tokens
(teacher-forced), so every step compares the same context. Rank 0 writes OUT (JSON):
per bit width, the greedy agreement with full precision and max/mean |delta logit|."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_kvshard.config import ModelConfig
from mlx_kvshard.engine.dist import init_comm
from mlx_kvshard.engine.generate import DecodeTimings, SamplingParams, generate_tokens
from mlx_kvshard.engine.loader import load_rank_model
from mlx_kvshard.plan import ShardPlan
from mlx_kvshard.settings import KVSettings


def forced_logits(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Logits for each of `tokens`, predicted after the prompt and the tokens before it."""
    cache = model.make_cache()
    out = [model(mx.array(prompt)[None], cache, last_only=True)[0, -1]]
    for t in tokens[:-1]:
        out.append(model(mx.array([[t]]), cache, last_only=True)[0, -1])
        mx.eval(out[-1])
    return np.stack([np.array(x) for x in out])


def main(model_dir: Path, out: Path, n: int, group_size: int) -> None:
    comm = init_comm("ring")
    cfg = ModelConfig.from_file(model_dir)
    prompt = [5, 17, 42, 99, 3, 250, 11, 7, 64, 128, 33, 2]
    report, ref = {"world": comm.world, "tokens": n, "group_size": group_size}, None
    for bits in (None, 8, 4):
        plan = ShardPlan.build(cfg, comm.world, compute_dtype="float32",
                               kv=KVSettings(bits=bits, group_size=group_size))
        model = load_rank_model(model_dir, plan, comm, mx.float32)
        tokens = list(generate_tokens(model, model.make_cache(), prompt, SamplingParams(max_tokens=n), 1 << 20,
                                      timings=DecodeTimings()))
        if ref is None:
            ref = (tokens, forced_logits(model, prompt, tokens))
        logits = forced_logits(model, prompt, ref[0])
        diff = np.abs(logits - ref[1])
        same = [a == b for a, b in zip(tokens, ref[0])]
        report[str(bits or "fp")] = {
            "tokens": tokens, "agreement": sum(same) / n,
            "first_divergence": same.index(False) if False in same else None,
            "max_abs_dlogit": float(diff.max()), "mean_abs_dlogit": float(diff.mean()),
            # same context, same next token? (free-running agreement ends at the first divergence)
            "forced_top1_agreement": float(np.mean(logits.argmax(-1) == ref[1].argmax(-1))),
        }
    if comm.rank == 0:
        out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
