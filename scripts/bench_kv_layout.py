"""Issue 17 part 2: the running rows' KV layout, length groups (`--kv-layout groups`, the
default) beside one left-padded batch (`padded`, the layout before), in one run on one
machine. World 1 in process (every rank of a cluster holds the same layout of its own
heads); the prefix cache off, so only the running rows hold KV. After every engine step the
script reads the batch's KV bytes and its rows' live tokens.

1. mixed: one long request beside many short ones (a closed loop of clients). KV bytes
   held / (live tokens x bytes per token): time-weighted mean, p95 and max over the steps
   in which rows decode; with the pending prompts' caches too.
2. admission: the same workload under `--max-kv-tokens` sized for the long request and a
   few short ones: how long the short requests waited to be admitted while the long one ran,
   and how many rows decoded beside it.
3. decode: median decode-only step time at equal batch and equal lengths (the groups
   layout is then one group: the padded batch itself), and at one batch of mixed lengths.
4. serve mix: bench_serve.py's closed loop (8 clients, prompts of 16-96 tokens, 16-48 new)
   in process: generated tokens per second of wall, groups vs padded.

    python scripts/bench_kv_layout.py                 # SmolLM2-135M (dequantized float32) when cached, else tiny
    python scripts/bench_kv_layout.py --model tiny --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

REAL = Path(os.path.expanduser("~/.cache/mlx-kvshard/real/smollm2-mlx-float32-dequantized"))


def run_engine(model: str, layout: str, body, context: int, prefill_step: int = 256, **engine):
    """Run `body(engine)` against an in-process world-1 engine; returns (its result, the
    per-step samples, bytes per token)."""
    from mlx_kvshard.engine.generate import SamplingParams  # noqa: F401 (warm import before timing)
    from mlx_kvshard.serving import batch as batchmod
    from inprocess import with_engine  # tests/ (on the path through benchlib)
    from mlx_kvshard.settings import EngineSettings, ModelSettings, RankSettings

    import mlx.core as mx

    samples, out = [], {}
    apply = batchmod.BatchState.apply

    def sampled(self, step):
        o = apply(self, step)
        samples.append({"t": time.perf_counter(), "decode_only": bool(step.decode) and not step.prefill
                        and not step.join and not step.remove, "decode_s": o.decode_s, "rows": len(self.live),
                        "slots": len(self.rows), "batch_bytes": self.kv.nbytes(), "all_bytes": self.kv_bytes(),
                        "tokens": sum(self.kv.row_tokens()), "groups": self.kv.groups(),
                        "active": mx.get_active_memory()})  # buffers alive: a view's hidden columns count
        return o

    def measured(eng):
        out["idle_active"] = mx.get_active_memory()  # weights, before any request
        result = body(eng)
        out["per_token"] = eng.rank_capacity[0]["kv_bytes_per_token"]
        return result

    batchmod.BatchState.apply = sampled
    try:
        settings = RankSettings(model=ModelSettings(model, "float32", context, 256))
        out["result"] = with_engine(settings, EngineSettings(kv_layout=layout, prefix_cache_bytes=0,
                                                             prefill_step=prefill_step, prefill_decode_ratio=0,
                                                             **engine), measured)
    finally:
        batchmod.BatchState.apply = apply
    for x in samples:
        x["physical"] = x["active"] - out["idle_active"]
    return out["result"], samples, out["per_token"]


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 500) for _ in range(n)]


def mixed_workload(rng: random.Random, long_prompt: int, long_new: int, shorts: int) -> list[tuple[list[int], int]]:
    work = [(ids(rng, long_prompt), long_new)]
    work += [(ids(rng, rng.randrange(16, 97)), rng.randrange(16, 65)) for _ in range(shorts)]
    return work


def closed_loop(work, clients: int):
    """The long request first, then `clients - 1` clients take short requests in turn; each
    request's (submit time, first token time, end time)."""
    from mlx_kvshard.engine.generate import SamplingParams
    from mlx_kvshard.serving.requests import Request

    def body(engine):
        times = [None] * len(work)
        queue = list(range(1, len(work)))
        lock = threading.Lock()

        def one(i):
            prompt, n = work[i]
            t0 = time.perf_counter()
            first = None
            for _ in engine.submit(Request(prompt_ids=prompt, params=SamplingParams(max_tokens=n))):
                first = first or time.perf_counter()
            times[i] = (t0, first, time.perf_counter())

        def client():
            while True:
                with lock:
                    if not queue:
                        return
                    i = queue.pop(0)
                one(i)

        threads = [threading.Thread(target=one, args=(0,))]
        threads += [threading.Thread(target=client) for _ in range(clients - 1)]
        for t in threads:
            t.start()
            time.sleep(0.05)  # the long request is admitted first
        for t in threads:
            t.join()
        return times
    return body


def ratios(samples, per_token: int) -> dict:
    """Over the steps in which rows decode: held bytes / live bytes, weighted by step time."""
    rows = []
    for a, b in zip(samples, samples[1:]):
        if a["rows"] and a["tokens"]:
            live = a["tokens"] * per_token
            rows.append((b["t"] - a["t"], a["batch_bytes"] / live, a["all_bytes"] / live, a["physical"] / live,
                         a["groups"]))
    total = sum(r[0] for r in rows)

    def stats(k):
        vals = sorted(r[k] for r in rows)
        return {"mean": sum(r[0] * r[k] for r in rows) / total, "p95": vals[int(0.95 * (len(vals) - 1))],
                "max": vals[-1]}
    return {"steps": len(rows), "batch": stats(1), "with_pending": stats(2), "physical": stats(3),
            "max_groups": max(r[4] for r in rows)}


def admission(times, samples) -> dict:
    long_start, _, long_end = times[0]
    waits = [first - t0 for t0, first, _ in times[1:] if t0 < long_end]
    beside = [s["rows"] for s in samples if long_start <= s["t"] <= long_end]
    return {"shorts_during_long": len(waits), "short_ttft_mean_s": statistics.mean(waits) if waits else None,
            "short_ttft_max_s": max(waits) if waits else None, "max_rows_beside_long": max(beside) - 1,
            "wall_s": max(e for *_, e in times) - long_start}


def decode_steps(model: str, layout: str, lengths: list[int], new: int, context: int) -> float:
    from mlx_kvshard.engine.generate import SamplingParams
    from mlx_kvshard.serving.requests import Request

    rng = random.Random(3)
    work = [ids(rng, n) for n in lengths]

    def body(engine):
        handles = [engine.submit(Request(prompt_ids=p, params=SamplingParams(max_tokens=new))) for p in work]
        return [h.result().tokens for h in handles]

    # every prompt prefilled in the first step, so all rows decode together from the next
    tokens, samples, _ = run_engine(model, layout, body, context, prefill_step=sum(lengths), max_batch=len(lengths))
    full = [s["decode_s"] for s in samples if s["decode_only"] and s["rows"] == len(lengths)]
    return {"median_s": statistics.median(full), "steps": len(full), "tokens": tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REAL) if REAL.exists() else "tiny")
    p.add_argument("--quick", action="store_true", help="a smaller workload (a smoke run)")
    p.add_argument("--only-mix", action="store_true", help="only part 4 (the serve mix)")
    p.add_argument("--only-mixed", action="store_true", help="only parts 1 and 2 (the mixed workload)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args()
    env = benchlib.rank_env(1)
    if env.get("LD_PRELOAD") and os.environ.get("LD_PRELOAD") != env["LD_PRELOAD"]:  # OpenBLAS, as ranks run
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    quick = a.quick
    long_prompt, long_new, shorts, clients = (512, 64, 12, 6) if quick else (1536, 192, 40, 8)
    context = 2048
    new = 16 if quick else 32
    work = mixed_workload(random.Random(1), long_prompt, long_new, shorts)
    long_reserve = long_prompt + long_new
    capacity = long_reserve + 4 * 160  # the long request and ~4 short ones, each row its own tokens
    res = {"model": a.model, "machine": benchlib.machine()}
    for layout in () if a.only_mix else ("groups", "padded"):
        times, samples, per_token = run_engine(a.model, layout, closed_loop(work, clients), context,
                                               max_batch=clients)
        res[f"mixed_{layout}"] = {**ratios(samples, per_token), **admission(times, samples)}
        times, samples, _ = run_engine(a.model, layout, closed_loop(work, clients), context, max_batch=clients,
                                       max_kv_tokens=capacity)
        res[f"admission_{layout}"] = {"max_kv_tokens": capacity, **admission(times, samples)}
        print(layout, json.dumps({k: v for k, v in res.items() if k.endswith(layout)}), flush=True)
    equal, varied = [256] * 8, [32, 64, 128, 256, 384, 512, 768, 1024]
    for name, lengths in () if a.only_mix or a.only_mixed else (("equal", equal), ("varied", varied)):
        got = {layout: decode_steps(a.model, layout, lengths, new, context)
               for layout in ("groups", "padded")}
        res[f"decode_{name}"] = {"lengths": lengths, "groups_s": got["groups"]["median_s"],
                                 "padded_s": got["padded"]["median_s"],
                                 "ratio": got["groups"]["median_s"] / got["padded"]["median_s"],
                                 "steps": [got[k]["steps"] for k in ("groups", "padded")],
                                 "same_tokens": got["groups"]["tokens"] == got["padded"]["tokens"]}
        print(name, json.dumps(res[f"decode_{name}"]), flush=True)
    mix = [(16, 24), (48, 16), (96, 32), (32, 48)]  # bench_serve.py's MIX
    rng = random.Random(5)
    work = [(ids(rng, n), m) for n, m in mix * (4 if quick else 16)]
    got = {"groups": [], "padded": []}
    for _ in range(0 if a.only_mixed else 1 if quick else 3):  # interleaved rounds: the median of each
        for layout in got:
            times, samples, _ = run_engine(a.model, layout, closed_loop(work, 8), context, max_batch=8)
            wall = max(e for *_, e in times) - min(t for t, *_ in times)
            got[layout].append({"tok_s": sum(m for _, m in work) / wall, "max_groups": max(x["groups"] for x in samples)})
    for layout, runs in got.items() if not a.only_mixed else ():
        res[f"serve_mix_{layout}"] = {"tok_s": statistics.median(r["tok_s"] for r in runs),
                                      "runs": [round(r["tok_s"], 1) for r in runs],
                                      "max_groups": max(r["max_groups"] for r in runs)}
        print("serve mix", layout, json.dumps(res[f"serve_mix_{layout}"]), flush=True)
    res["load_end"] = os.getloadavg()[0]
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
