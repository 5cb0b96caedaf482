"""Where a serving-engine step's time goes, in one process at world 1 (no ranks, no HTTP).

Runs the `tiny` bench checkpoint (scripts/benchlib.py) through the `Engine` in-process, 16
requests at once (prompts of 16-96 tokens, 32-48 greedy tokens; `--shared N` puts the same
N-token preamble in front of every prompt, warmed into the prefix cache first), optionally
as a closed loop (`--closed`: 16 clients, 3 requests each), and prints: the median wall time
of the steps that decode 16 rows and prefill nothing, the seconds spent in each
`BatchState` phase (decode forward, prefill forwards, join, remove, prefix keep) and in
sampling, and a digest of every request's tokens (equal digests = identical tokens, to
check that a change keeps exactness). `--ref` runs mlx-lm's `BatchGenerator` on the same
model and prompts instead. `--profile` adds cProfile of the engine thread.

Run it as the benchmarks run ranks (OpenBLAS preloaded; MLX's bundled BLAS makes a
batch-16 step ~4x slower here):
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=2 \\
    PYTHONPATH=$PWD python scripts/profile_engine.py [--shared 192] [--closed] [--ref]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pstats
import random
import statistics
import threading
import time

import benchlib as B
import mlx.core as mx

from mlx_kvshard.engine.generate import SamplingParams
from mlx_kvshard.serving import batch as batchmod
from mlx_kvshard.serving.requests import Request
from mlx_kvshard.serving.worker import serve_rank
from mlx_kvshard.settings import EngineSettings, ModelSettings, RankSettings

PHASES = ["_decode", "_prefill", "_join", "_remove", "_keep", "_start_cache"]


def workload(shared: int) -> tuple[list[int], list[list[int]], list[int]]:
    rng = random.Random(0)
    pre = [rng.randrange(10, 4000) for _ in range(shared)]
    prompts = [pre + [rng.randrange(10, 4000) for _ in range(rng.choice([16, 48, 96, 32]))] for _ in range(16)]
    return pre, prompts, [rng.choice([32, 40, 48]) for _ in range(16)]


def timed(times: dict, name: str, f):
    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
    return g


def drive(engine, a, pre, prompts, max_tokens) -> list[list[int]]:
    if pre:  # put the preamble in the prefix cache
        engine.generate(Request(prompt_ids=pre + [5, 6], params=SamplingParams(max_tokens=2)))
    if not a.closed:
        handles = [engine.submit(Request(prompt_ids=p, params=SamplingParams(max_tokens=m)))
                   for p, m in zip(prompts, max_tokens)]
        return [h.result().tokens for h in handles]
    out: list = [None] * 48

    def client(c: int) -> None:
        for k in range(3):
            i = c + 16 * k
            req = Request(prompt_ids=prompts[c][:-1] + [c, k], params=SamplingParams(max_tokens=max_tokens[c]))
            out[i] = engine.generate(req).tokens
    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def run_engine(a, model_dir) -> dict:
    pre, prompts, max_tokens = workload(a.shared)
    times: dict[str, float] = {}
    for name in PHASES:
        setattr(batchmod.BatchState, name, timed(times, name, getattr(batchmod.BatchState, name)))
    res: dict = {}

    def front(engine):
        engine._sample = timed(times, "sample", engine._sample)

        def body():
            try:
                res["tokens"] = drive(engine, a, pre, prompts, max_tokens)
                res["steps"] = engine.metrics.snapshot(recent=4096)["recent_steps"]
            except BaseException as e:
                res["error"] = e
            finally:
                engine.shutdown(cancel=True)
        threading.Thread(target=body).start()
        prof = cProfile.Profile() if a.profile else None
        if prof:
            prof.enable()
        engine.run()
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return 0

    serve_rank(RankSettings(model=ModelSettings(str(model_dir), "float32", 4096, 512)), EngineSettings(max_batch=16), front)
    if "error" in res:
        raise res["error"]
    full = [s["wall_s"] for s in res["steps"] if s["batch"] == 16 and s["prefill_tokens"] == 0]
    return {"steps": len(res["steps"]), "batch16_decode_steps": len(full),
            "batch16_step_ms": round(1000 * statistics.median(full), 1) if full else None,
            "seconds": {k: round(v, 3) for k, v in times.items()},
            "digest": hashlib.sha1(json.dumps(res["tokens"]).encode()).hexdigest()[:12]}


def run_ref(a, model_dir) -> dict:
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.utils import load

    _, prompts, max_tokens = workload(a.shared)
    model, _ = load(str(model_dir))
    model.set_dtype(mx.float32)
    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=16, prefill_batch_size=16)
    gen.insert(prompts, max_tokens)
    stamps = []
    while responses := gen.next_generated():
        stamps.append((time.perf_counter(), len(responses)))
    gen.close()
    gaps = [b[0] - a_[0] for a_, b in zip(stamps, stamps[1:]) if b[1] == 16]
    return {"steps": len(stamps), "batch16_step_ms": round(1000 * statistics.median(gaps), 1) if gaps else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=int, default=0, help="tokens of preamble every prompt shares")
    p.add_argument("--closed", action="store_true", help="16 clients x 3 requests, back to back")
    p.add_argument("--ref", action="store_true", help="mlx-lm BatchGenerator instead of the engine")
    p.add_argument("--profile", action="store_true", help="cProfile the engine thread")
    p.add_argument("--preset", default="tiny", choices=sorted(B.PRESETS))
    a = p.parse_args()
    model_dir = B.bench_model_dir(a.preset)
    print(json.dumps((run_ref if a.ref else run_engine)(a, model_dir)))


if __name__ == "__main__":
    main()
