"""mlx-lm's own generation as a benchmark rank: single-process (world 1), its
`Model.shard()` tensor parallelism, or its pipeline (`model.model.pipeline(group)`, as
`mlx_lm.generate --pipeline`; the models with PipelineMixin, e.g. qwen2) under MLX's launcher. Times prefill and decode the
way `mlx-kvshard generate --json` does (greedy, no chat template, same prompt ids) and
counts the all_sums shard() issues per decode step. Each rank writes <out>/rank<R>.json."""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import load_model

COUNT = {"collectives": 0, "bytes": 0}
_all_sum = mx.distributed.all_sum


def counting_all_sum(x, *args, **kwargs):
    # shard_linear's layers call mx.distributed.all_sum at run time: count each call
    COUNT["collectives"] += 1
    COUNT["bytes"] += x.nbytes
    return _all_sum(x, *args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard", action="store_true")
    p.add_argument("--pipeline", action="store_true", help="mlx-lm's pipeline split instead of shard()")
    p.add_argument("--kv-bits", type=int, default=None, help="mlx-lm's QuantizedKVCache from the first token")
    p.add_argument("--kv-group-size", type=int, default=64)
    a = p.parse_args()

    group = mx.distributed.init(strict=True, backend="ring") if a.shard or a.pipeline else None
    rank = group.rank() if group is not None else 0
    mx.distributed.all_sum = counting_all_sum
    tokenizer = load_tokenizer(Path(a.model))
    ids = tokenizer.encode(a.prompt)
    mx.reset_peak_memory()
    t_load = time.perf_counter()
    model, _ = load_model(Path(a.model))
    model.set_dtype(mx.float32)
    if group is not None and a.pipeline:
        model.model.pipeline(group)
    elif group is not None:
        model.shard(group)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t_load

    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    if a.kv_bits:
        from mlx_lm.models.cache import QuantizedKVCache

        cache = [QuantizedKVCache(group_size=a.kv_group_size, bits=a.kv_bits) for _ in cache]
    sampler = lambda lp: mx.argmax(lp, axis=-1)
    tokens = []
    t0 = time.perf_counter()
    t_first = None
    before = None
    for i, (tok, _) in enumerate(generate_step(mx.array(ids), model, max_tokens=a.max_tokens,
                                               sampler=sampler, prompt_cache=cache)):
        if i == 0:
            t_first = time.perf_counter()
            before = dict(COUNT)  # prefill and the first decode step are dispatched by now
        tokens.append(tok)
    t_end = time.perf_counter()
    steps = max(1, len(tokens) - 1)
    decode_s = t_end - t_first
    ttft = t_first - t0
    report = {
        "rank": rank,
        "world": group.size() if group is not None else 1,
        "prompt_tokens": len(ids),
        "tokens": tokens,
        "timings": {
            "load_s": load_s,
            "ttft_s": ttft,
            "prefill_tok_s": len(ids) / ttft,
            "decode_tok_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 else None,
            "time_per_output_token_s": decode_s / (len(tokens) - 1) if len(tokens) > 1 else None,
        },
        "comm": {
            "collectives_per_token": (COUNT["collectives"] - before["collectives"]) / steps,
            "bytes_per_token": (COUNT["bytes"] - before["bytes"]) / steps,
        },
        "peak_memory_bytes": mx.get_peak_memory(),
        "weight_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        "kv_bytes": sum(c.nbytes for c in cache),
    }
    Path(a.out, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
