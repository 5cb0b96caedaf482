"""Rank program of scripts/bench_engine.py: every rank runs the serving engine; rank 0's
front submits the benchmark's requests through the Engine API and writes the timings.

    bench_engine_rank.py MODEL OUT.json --concurrency 1,2,4,8,16 --prompt-tokens 64 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_kvshard.engine.generate import SamplingParams  # noqa: E402
from mlx_kvshard.launch.secrets import take_from_stdin  # noqa: E402
from mlx_kvshard.serving.requests import Request  # noqa: E402
from mlx_kvshard.serving.worker import serve_rank  # noqa: E402
from mlx_kvshard.settings import EngineSettings, ModelSettings, RankSettings  # noqa: E402


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Distinct random prompts (ids past the first few, which hold the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


def timed(engine, ids: list[int], max_tokens: int, stamps: list) -> threading.Thread:
    """Submit one request; `stamps` gets its submit time, then each token's arrival time."""
    stamps.append(time.perf_counter())
    handle = engine.submit(Request(prompt_ids=ids, params=SamplingParams(max_tokens=max_tokens)))

    def consume():
        for ev in handle:
            if ev.kind == "token":
                stamps.append(time.perf_counter())
    t = threading.Thread(target=consume)
    t.start()
    return t


def sweep(engine, a) -> dict:
    vocab = engine.loaded.cfg.vocab_size
    out = {"concurrency": {}}
    timed(engine, prompts(vocab, 1, a.prompt_tokens, seed=99)[0], 4, []).join()  # warm-up
    for c in a.concurrency:
        stamps = [[] for _ in range(c)]
        t0 = time.perf_counter()
        threads = [timed(engine, ids, a.max_tokens, s) for ids, s in zip(prompts(vocab, c, a.prompt_tokens, c), stamps)]
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        out["concurrency"][c] = {"wall_s": wall, "tokens": sum(len(s) - 1 for s in stamps), "stamps": stamps}
    if a.long_prompt:
        out["long_prompt"] = interference(engine, a, vocab)
    return out


def interference(engine, a, vocab) -> dict:
    """TPOT of 4 running requests before and while a long prompt prefills."""
    stamps = [[] for _ in range(4)]
    threads = [timed(engine, ids, a.max_tokens * 2, s) for ids, s in zip(prompts(vocab, 4, a.prompt_tokens, 7), stamps)]
    while min(map(len, stamps)) < 9:  # submit time + 8 tokens each
        time.sleep(0.01)
    long_stamps: list[float] = []
    timed(engine, prompts(vocab, 1, a.long_prompt, 5)[0], 1, long_stamps).join()
    for t in threads:
        t.join()
    return {"long_stamps": long_stamps, "stamps": stamps}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--long-prompt", type=int, default=2048)
    p.add_argument("--prefill-step", type=int, default=512)
    a = p.parse_args()
    take_from_stdin()  # the coordinator's token comes on stdin (mlx_kvshard/launch/secrets.py)
    a.concurrency = [int(x) for x in a.concurrency.split(",")]
    settings = RankSettings(model=ModelSettings(a.model, "float32", 4096, a.prefill_step))
    es = EngineSettings(max_batch=16, prefill_step=a.prefill_step, prefix_cache_bytes=0)

    def front(engine):
        result = {}

        def drive():
            try:
                result.update(sweep(engine, a))
                result["metrics"] = engine.metrics.snapshot(recent=100000)
                result["world"] = engine.comm.world
            finally:
                engine.shutdown()
        threading.Thread(target=drive).start()
        engine.run()
        Path(a.out).write_text(json.dumps(result))
        return 0

    return serve_rank(settings, es, front)


if __name__ == "__main__":
    raise SystemExit(main())
