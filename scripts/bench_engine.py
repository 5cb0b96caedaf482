"""The serving engine under concurrency, side by side with mlx-lm's BatchGenerator.

For each world size, one engine (`scripts/bench_engine_rank.py` on that many local ranks,
under the liveness coordinator as `--simulate` runs them) takes 1, 2, 4, 8, 16 concurrent
requests in turn (distinct random prompts, greedy, fixed lengths); then 4 requests decode
while a 2K-token prompt prefills. mlx-lm's `BatchGenerator` (world 1, one process) runs the
same prompt ids at the same concurrencies. Reported: aggregate tok/s (generated tokens /
wall time from the first submit to the last token), TTFT and TPOT p50/p95, and the TPOT of
running requests before and during the long prefill. Writes docs/bench/engine-<machine>.json
and its table in docs/benchmarks.md.

    python scripts/bench_engine.py                       # preset small, worlds 1,2: ~10 min on 2 cores
    python scripts/bench_engine.py --preset tiny --concurrency 1,4 --long-prompt 256   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(stamps: list[list[float]], wall: float) -> dict:
    """stamps: per request [submit time, token times...]."""
    ttft = [s[1] - s[0] for s in stamps if len(s) > 1]
    tpot = [(s[-1] - s[1]) / (len(s) - 2) for s in stamps if len(s) > 2]
    tokens = sum(len(s) - 1 for s in stamps)
    return {"tok_s": tokens / wall, "ttft_p50": pct(ttft, .5), "ttft_p95": pct(ttft, .95),
            "tpot_p50": pct(tpot, .5), "tpot_p95": pct(tpot, .95), "tokens": tokens, "wall_s": wall}


def interference(r: dict) -> dict:
    """Inter-token gaps of the running requests before the long prompt arrived, and while it prefilled."""
    t_submit, t_first = r["long_stamps"][0], r["long_stamps"][1]
    before, during = [], []
    for s in r["stamps"]:
        for a, b in zip(s[1:], s[2:]):
            if b <= t_submit:
                before.append(b - a)
            elif a >= t_submit and b <= t_first:
                during.append(b - a)
            elif a < t_first and b > t_submit:
                during.append(b - a)
    return {"tpot_before_p50": pct(before, .5), "tpot_before_p95": pct(before, .95),
            "tpot_during_p50": pct(during, .5), "tpot_during_p95": pct(during, .95),
            "long_prefill_s": t_first - t_submit, "gaps_during": len(during)}


def run_ours(model_dir: Path, world: int, a, tmp: Path) -> dict:
    from mlx_kvshard.launch.restart import supervise
    from mlx_kvshard.launch.simulate import run_local

    out = tmp / f"ours-{world}.json"
    cmd = [sys.executable, str(B.SCRIPTS / "bench_engine_rank.py"), str(model_dir), str(out),
           "--concurrency", a.concurrency, "--prompt-tokens", str(a.prompt_tokens), "--max-tokens",
           str(a.max_tokens), "--long-prompt", str(a.long_prompt), "--prefill-step", str(a.prefill_step)]
    env = {"PYTHONPATH": str(B.REPO)}
    attempt = supervise(["127.0.0.1"] * world, lambda e, stop: run_local(world, [], env={**env, **e}, command=cmd,
                                                                        on_interrupt=stop),
                        peer_timeout=30, step_timeout=a.timeout)
    if attempt.code != 0:
        raise B.BenchError(f"ours at world {world} failed (exit {attempt.code})")
    return json.loads(out.read_text())


def run_mlxlm(model_dir: Path, a, tmp: Path) -> dict:
    out = tmp / "mlxlm.json"
    cmd = [sys.executable, __file__, "--mlxlm-worker", str(model_dir), str(out), "--concurrency", a.concurrency,
           "--prompt-tokens", str(a.prompt_tokens), "--max-tokens", str(a.max_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout * 4, env=B.rank_env(1), cwd=B.REPO)
    if proc.returncode != 0:
        raise B.BenchError(f"mlx-lm BatchGenerator failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def mlxlm_worker(argv: list[str]) -> None:
    """mlx-lm's BatchGenerator on the same prompt ids, token arrival times recorded per request."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.utils import load

    from bench_engine_rank import prompts

    model_dir, out = argv[0], argv[1]
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency")
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--max-tokens", type=int)
    a = p.parse_args(argv[2:])
    model, tokenizer = load(model_dir)
    model.set_dtype(mx.float32)
    vocab = model.args.vocab_size
    result = {"concurrency": {}}
    for warm, c in [(True, 1)] + [(False, int(x)) for x in a.concurrency.split(",")]:
        ids = prompts(vocab, 1, a.prompt_tokens, seed=99) if warm else prompts(vocab, c, a.prompt_tokens, c)
        gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], completion_batch_size=16)
        t0 = time.perf_counter()
        uids = gen.insert(ids, [a.max_tokens] * len(ids))
        stamps = {u: [t0] for u in uids}
        while responses := gen.next_generated():
            now = time.perf_counter()
            for r in responses:
                if r.finish_reason != "stop":
                    stamps[r.uid].append(now)
        gen.close()
        if not warm:
            result["concurrency"][str(c)] = {"wall_s": time.perf_counter() - t0, "stamps": list(stamps.values())}
    Path(out).write_text(json.dumps(result))


def table(rows: list[dict], inter: dict, a, machine: str) -> str:
    lines = [f"Serving engine vs mlx-lm BatchGenerator, preset `{a.preset}`, {a.prompt_tokens}-token prompts, "
             f"{a.max_tokens} greedy tokens each, `--prefill-step {a.prefill_step}` ({B.timestamp()}; {machine})", "",
             "| system | world | concurrent | aggregate tok/s | TTFT p50 / p95 (s) | TPOT p50 / p95 (ms) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['world']} | {r['c']} | {B.fmt(r['tok_s'])} | "
                     f"{B.fmt(r['ttft_p50'], '.2f')} / {B.fmt(r['ttft_p95'], '.2f')} | "
                     f"{B.fmt(r['tpot_p50'] and 1000 * r['tpot_p50'])} / {B.fmt(r['tpot_p95'] and 1000 * r['tpot_p95'])} |")
    lines += ["", f"TPOT of 4 running requests while a {a.long_prompt}-token prompt prefills:", "",
              "| world | before p50 / p95 (ms) | during p50 / p95 (ms) | p95 ratio | long prefill (s) |",
              "|---|---|---|---|---|"]
    for w, r in inter.items():
        ratio = r["tpot_during_p95"] / r["tpot_before_p95"] if r["tpot_during_p95"] and r["tpot_before_p95"] else None
        ms = lambda v: B.fmt(v and 1000 * v)  # noqa: E731
        lines.append(f"| {w} | {ms(r['tpot_before_p50'])} / {ms(r['tpot_before_p95'])} | "
                     f"{ms(r['tpot_during_p50'])} / {ms(r['tpot_during_p95'])} | {B.fmt(ratio, '.1f')}x | "
                     f"{B.fmt(r['long_prefill_s'], '.2f')} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--mlxlm-worker":
        mlxlm_worker(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    B.add_common_args(p, preset="small", worlds="1,2", max_tokens=32, runs=None)
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--long-prompt", type=int, default=2048)
    p.add_argument("--prefill-step", type=int, default=512)
    p.add_argument("--no-generate", action="store_true", help="skip the one-prompt `generate` reference rows")
    a = p.parse_args()
    worlds = B.apply_common_args(a)
    t0 = time.time()
    model_dir = B.bench_model_dir(a.preset)
    rows, inter, raw = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            r = raw[f"ours-{world}"] = run_ours(model_dir, world, a, Path(tmp))
            for c, v in r["concurrency"].items():
                rows.append({"system": "mlx-kvshard engine", "world": world, "c": int(c), **summarize(v["stamps"], v["wall_s"])})
            if "long_prompt" in r:
                inter[world] = interference(r["long_prompt"])
            if not a.no_generate:  # the one-prompt path: what the engine's per-step token round trip costs
                g = raw[f"generate-{world}"] = B.run_ours(model_dir, world, B.prompt_text(model_dir, a.prompt_tokens),
                                                          a.max_tokens, a.timeout)
                t = g["timings"]
                rows.append({"system": "mlx-kvshard generate (one prompt)", "world": world, "c": 1,
                             "tok_s": a.max_tokens / (t["ttft_s"] + (a.max_tokens - 1) * t["time_per_output_token_s"]),
                             "ttft_p50": t["ttft_s"], "ttft_p95": t["ttft_s"], "tpot_p50": t["time_per_output_token_s"],
                             "tpot_p95": t["time_per_output_token_s"], "tokens": a.max_tokens, "wall_s": None})
            print(f"world {world} done", flush=True)
        r = raw["mlxlm"] = run_mlxlm(model_dir, a, Path(tmp))
        for c, v in r["concurrency"].items():
            rows.append({"system": "mlx-lm BatchGenerator", "world": 1, "c": int(c), **summarize(v["stamps"], v["wall_s"])})
    rows.sort(key=lambda r: (r["c"], r["world"], r["system"]))
    text = table(rows, inter, a, "Linux x86_64, 2-core AMD EPYC KVM, MLX 0.32.4 CPU, OpenBLAS")
    report = {"machine": B.machine(), "preset": a.preset, "rows": rows, "interference": inter,
              "args": {k: v for k, v in vars(a).items() if k not in ("out", "doc")}}
    B.publish(a, "engine", report, text, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
