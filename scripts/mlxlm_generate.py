"""mlx-lm's own `generate` path (mlx_lm.generate.stream_generate, whose prompt_tps and
generation_tps `mlx_lm.generate --verbose` prints) on one checkpoint, greedy, no chat
template: the reference beside `mlx-kvshard generate --json` in scripts/bench_real.py.
Prints one JSON object."""

import argparse
import json
import time

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.utils import load


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--dtype", default="auto", help="float32/float16/bfloat16, or auto: the checkpoint's own")
    a = p.parse_args()
    t0 = time.perf_counter()
    model, tok = load(a.model)
    if a.dtype != "auto":
        model.set_dtype(getattr(mx, a.dtype))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    ids = tok.encode(a.prompt)
    last, tokens = None, []
    for r in stream_generate(model, tok, ids, max_tokens=a.max_tokens, sampler=lambda lp: mx.argmax(lp, axis=-1)):
        last = r
        tokens.append(int(r.token))
    print(json.dumps({"load_s": load_s, "prompt_tokens": last.prompt_tokens, "prefill_tok_s": last.prompt_tps,
                      "decode_tok_s": last.generation_tps, "generated": last.generation_tokens,
                      "peak_memory_bytes": mx.get_peak_memory(), "tokens": tokens}))


if __name__ == "__main__":
    main()
