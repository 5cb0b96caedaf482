"""OpenAI-API load against `mlx-kvshard serve` and `mlx_lm.server` on the same checkpoint,
in one run: request throughput, aggregate tok/s, TTFT and TPOT p50/p95, cached-token share.

Closed loop: C clients each send streamed /v1/completions requests back to back (greedy;
the bench checkpoints never emit EOS, so every request generates exactly its max_tokens)
from a fixed mix of prompt/output lengths. Mixes: `unique` (no two prompts share a
prefix) and `shared` (every prompt starts with the same long preamble, as a system prompt
or an earlier chat turn does). Ours runs the shared mix twice: prefix cache on and off.

    python scripts/bench_serve.py                         # tiny preset, C = 1,4,16, world 1 (+2 for ours)
    python scripts/bench_serve.py --concurrency 1,2,4,8,16 --preset small --worlds 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

MIX = [(16, 24), (48, 16), (96, 32), (32, 48)]  # (prompt tokens, max tokens), cycled
SHARED_PREFIX_TOKENS = 192


def prompts(model_dir: Path, mix: str, n: int, salt: int) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs, new for each `salt` (a run does not hit the previous
    run's prompts). `unique`: each prompt starts differently; `shared`: a common preamble,
    then a short different tail."""
    from mlx_kvshard.models.synth import _CORPUS

    words = _CORPUS.split()
    rng = random.Random(salt)
    preamble = benchlib.prompt_text(model_dir, SHARED_PREFIX_TOKENS)
    out = []
    for i in range(n):
        p_tokens, max_tokens = MIX[i % len(MIX)]
        tail = " ".join(rng.choice(words) for _ in range(max(1, p_tokens // 2)))  # ~2 tokens a word
        text = f"{salt}.{i} {tail}" if mix == "unique" else f"{preamble} {salt}.{i} {tail}"
        out.append((text, max_tokens))
    return out


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise benchlib.BenchError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise benchlib.BenchError(f"{url}: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            if obj.get("choices") and obj["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    n = usage["completion_tokens"] if usage else chunks
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else None, "tokens": n,
            "prompt_tokens": (usage or {}).get("prompt_tokens", 0), "cached_tokens": cached,
            "latency": last - t0}


def load(url: str, model: str, work: list[tuple[str, int]], concurrency: int) -> dict:
    """`concurrency` clients drain `work` (closed loop); aggregate numbers over the whole run."""
    results, lock, queue = [], threading.Lock(), list(reversed(work))
    errors = []

    def client_loop():
        with httpx.Client() as client:
            while True:
                with lock:
                    if not queue or errors:
                        return
                    prompt, max_tokens = queue.pop()
                try:
                    res = one_request(client, url, model, prompt, max_tokens)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise benchlib.BenchError(str(errors[0]))
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    return {"requests": len(results), "wall_s": wall, "req_s": len(results) / wall,
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "tpot_p50": pct(tpot, 50), "tpot_p95": pct(tpot, 95),
            "cached_share": sum(r["cached_tokens"] for r in results) / prompt_tokens if prompt_tokens else 0.0}


def pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


# ---- servers -----------------------------------------------------------------------------

class Running:
    def __init__(self, argv: list[str], env: dict, url: str, log: Path, cwd: Path = benchlib.REPO):
        self.url = url
        self.log = log
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                                     start_new_session=True, cwd=cwd)

    def wait(self, timeout: float) -> "Running":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise benchlib.BenchError(f"server exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise benchlib.BenchError(f"server not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_ours(model_dir: Path, world: int, port: int, prefix_cache: bool, log: Path, max_batch: int) -> Running:
    argv = [sys.executable, "-m", "mlx_kvshard", "serve", "--model", str(model_dir), "--simulate", str(world),
            "--port", str(port), "--max-context", "2048", "--max-batch", str(max_batch),
            "--prefix-cache-bytes", str(256 << 20 if prefix_cache else 0)]
    return Running(argv, benchlib.rank_env(world), f"http://127.0.0.1:{port}", log)


def start_mlxlm(model_dir: Path, port: int, log: Path, max_batch: int, world: int) -> Running:
    """mlx_lm.server; at world > 1 under MLX's ring launcher, where it shards the model with
    `shard()` (tensor parallelism: heads and MLP columns must divide by the world)."""
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(port),
            "--log-level", "WARNING", "--decode-concurrency", str(max_batch)]
    if world > 1:
        argv = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n", str(world),
                "--backend", "ring", "--starting-port", str(benchlib.free_port_base(world)), "--", *argv]
    return Running(argv, benchlib.rank_env(world), f"http://127.0.0.1:{port}", log)


def systems(worlds: list[int], mlxlm_worlds: list[int]) -> list[tuple[str, int, str, bool]]:
    """(system, world, mix, prefix cache) for every configuration measured."""
    out = []
    for w in mlxlm_worlds:
        out += [("mlx_lm.server", w, "unique", True), ("mlx_lm.server", w, "shared", True)]
    for w in worlds:
        out += [("mlx-kvshard", w, "unique", True), ("mlx-kvshard", w, "shared", True),
                ("mlx-kvshard", w, "shared", False)]
    return out


def measure(a, model_dir: Path, logs: Path, levels: list[int], system: str, world: int, mix: str, cache: bool,
            run: int) -> list[dict]:
    """One server up, warmed, then each concurrency level: a row each."""
    port = benchlib.free_port_base(1)
    log = logs / f"{system}-w{world}-{mix}-{'cache' if cache else 'nocache'}.log"
    server = (start_mlxlm(model_dir, port, log, max(levels), world) if system == "mlx_lm.server"
              else start_ours(model_dir, world, port, cache, log, max(levels)))
    rows = []
    try:
        server.wait(a.timeout)
        model = str(model_dir)
        load(server.url, model, prompts(model_dir, mix, 2, 0), 1)  # warm-up (compiles, caches the preamble)
        for c in levels:
            work = prompts(model_dir, mix, max(4, a.requests * c), salt=c + 1000 * run)
            rows.append({"system": system, "world": world, "mix": mix, "prefix_cache": cache, "concurrency": c,
                         "run": run, **load(server.url, model, work, c)})
            print(fmt_row(rows[-1]), flush=True)
    finally:
        server.stop()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(benchlib.PRESETS))
    p.add_argument("--worlds", default="1,2", help="world sizes for mlx-kvshard")
    p.add_argument("--mlxlm-worlds", default="1,2", help="world sizes for mlx_lm.server (tensor parallel at > 1)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=2, help="requests per client at each concurrency (min 4)")
    p.add_argument("--runs", type=int, default=1,
                   help="rounds over every system (interleaved); the table shows each row's median-tok/s run")
    p.add_argument("--timeout", type=float, default=600, help="seconds a server may take to come up")
    p.add_argument("--out", default=str(benchlib.REPO / "docs" / "bench"), help="folder for the JSON results")
    p.add_argument("--doc", default=str(benchlib.REPO / "docs" / "benchmarks.md"), help="markdown to update ('' = none)")
    p.add_argument("--machine-tag", default=benchlib.machine_tag(), help="tag for file and section names")
    a = p.parse_args()
    worlds = [int(w) for w in a.worlds.split(",")]
    mlxlm_worlds = [int(w) for w in a.mlxlm_worlds.split(",") if w]
    levels = [int(c) for c in a.concurrency.split(",")]
    model_dir = benchlib.bench_model_dir(a.preset)
    t0 = time.time()
    rows = []
    logs = Path(a.out) / "serve-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for run in range(a.runs):
        for system, world, mix, cache in systems(worlds, mlxlm_worlds):
            rows += measure(a, model_dir, logs, levels, system, world, mix, cache, run)
    report = {"machine": benchlib.machine(), "preset": a.preset, "mix": MIX, "shared_prefix_tokens":
              SHARED_PREFIX_TOKENS, "time": benchlib.timestamp(), "rows": rows}
    benchlib.publish(a, "serve", report, table(report), t0)
    return 0


HEADER = ("| system | world | mix | prefix cache | C | req/s | tok/s | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 "
          "| cached |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def ms(v) -> str:
    return "n/a" if v is None else f"{1000 * v:.0f} ms"


def fmt_row(r: dict) -> str:
    return (f"| {r['system']} | {r['world']} | {r['mix']} | {'on' if r['prefix_cache'] else 'off'} | "
            f"{r['concurrency']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {ms(r['ttft_p50'])} | {ms(r['ttft_p95'])} | "
            f"{ms(r['tpot_p50'])} | {ms(r['tpot_p95'])} | {100 * r['cached_share']:.0f}% |")


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['system']}, {m['cores']}-core {m['cpu']}, MLX {m['mlx']} CPU, {m['blas']}; "
             f"preset `{report['preset']}`, mix {report['mix']} (prompt, max tokens), shared preamble "
             f"{report['shared_prefix_tokens']} tokens; {report['time']}.", "", HEADER]
    groups: dict[tuple, list[dict]] = {}
    for r in report["rows"]:
        groups.setdefault((r["system"], r["world"], r["mix"], r["prefix_cache"], r["concurrency"]), []).append(r)
    runs = max(len(g) for g in groups.values())
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], not k[3], k[4])):
        g = sorted(groups[key], key=lambda r: r["tok_s"])
        row = fmt_row(g[len(g) // 2])
        if runs > 1:  # the median run, with the range of tok/s over the runs
            row = row.replace(f"| {g[len(g) // 2]['tok_s']:.1f} |",
                              f"| {g[len(g) // 2]['tok_s']:.1f} ({g[0]['tok_s']:.0f}-{g[-1]['tok_s']:.0f}) |", 1)
        lines.append(row)
    if runs > 1:
        lines.insert(1, f"\nMedian of {runs} interleaved runs (by tok/s; its range in brackets).")
    lines += ["", *ratios(groups)]
    return "\n".join(lines)


def ratios(groups: dict[tuple, list[dict]]) -> list[str]:
    """The issue's two targets from the median runs: ours / mlx_lm.server aggregate tok/s at
    equal world and concurrency, and ours' shared-mix TTFT p50 with the prefix cache / without."""
    def median(key, field):
        g = sorted(groups[key], key=lambda r: r["tok_s"])
        return g[len(g) // 2][field]

    out = []
    for (system, world, mix, cache, c) in sorted(groups):
        if system != "mlx-kvshard" or not cache:
            continue
        peer = ("mlx_lm.server", world, mix, True, c)
        if peer in groups:
            out.append(f"- world {world}, {mix}, C = {c}: tok/s ours / mlx_lm.server = "
                       f"{median((system, world, mix, cache, c), 'tok_s') / median(peer, 'tok_s'):.2f}")
        off = (system, world, mix, False, c)
        if mix == "shared" and off in groups:
            on_ttft, off_ttft = median((system, world, mix, cache, c), "ttft_p50"), median(off, "ttft_p50")
            out.append(f"- world {world}, shared, C = {c}: TTFT p50 prefix cache on / off = "
                       f"{on_ttft / off_ttft:.2f} ({1000 * on_ttft:.0f} / {1000 * off_ttft:.0f} ms)")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
