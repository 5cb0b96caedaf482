"""Sequence-sharded KV in the server, measured: world 4 on a model with 2 KV heads, replicate
vs sequence, side by side in one run on one machine.

1. `serve`'s /metrics: `mlx_kvshard_kv_tokens_admission_capacity` (what admission plans
   with) and each rank's KV positions capacity, with the free memory each rank measured
   (the capacity is a share of it, so the ratio is compared per byte of free memory too).
2. `generate --prompts-file --check-sync --engine-report`: the KV bytes each rank really
   holds (its batch cache's nbytes) with rows of known lengths in the batch.

    python scripts/bench_seq_serve.py            # tiny preset, 2 KV heads; ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from bench_serve import Running  # noqa: E402
from mlx_kvshard.config import ModelConfig  # noqa: E402
from mlx_kvshard.plan import ShardPlan  # noqa: E402
from mlx_kvshard.settings import KVSettings  # noqa: E402

WORLD = 4
CONTEXT = 4096


def scrape(url: str) -> dict:
    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            rank = s.labels.get("rank")
            if rank is None:
                out[s.name] = s.value
            else:
                out.setdefault(s.name, {})[int(rank)] = s.value
    return out


def server_capacity(model: Path, mode: str, tmp: Path, timeout: float) -> dict:
    port = benchlib.free_port_base(1)
    argv = [sys.executable, "-m", "mlx_kvshard", "serve", "--model", str(model), "--simulate", str(WORLD),
            "--port", str(port), "--max-context", str(CONTEXT), "--kv-shard", mode, "--prefix-cache-bytes", "0"]
    server = Running(argv, benchlib.rank_env(WORLD), f"http://127.0.0.1:{port}", tmp / f"serve-{mode}.log")
    try:
        server.wait(timeout)
        m = scrape(server.url)
        info = httpx.get(server.url + "/health", timeout=30).json()
    finally:
        server.stop()
    positions = m["mlx_kvshard_kv_positions_capacity"]
    return {"admission_capacity": m["mlx_kvshard_kv_tokens_admission_capacity"],
            "positions_capacity": [positions[r] for r in sorted(positions)],
            "tokens_capacity": [m["mlx_kvshard_kv_tokens_capacity"][r] for r in sorted(positions)],
            "health": info}


def held_bytes(model: Path, mode: str, tmp: Path, lengths: list[int], timeout: float) -> dict:
    """Every rank's measured batch KV bytes with rows of `lengths` prompt tokens decoding."""
    f = tmp / f"req-{mode}.jsonl"
    f.write_text("".join(json.dumps({"prompt": benchlib.prompt_text(model, n), "max_tokens": 4}) + "\n"
                         for n in lengths))
    report = tmp / f"report-{mode}.json"
    argv = [sys.executable, "-m", "mlx_kvshard", "generate", "--model", str(model), "--prompts-file", str(f),
            "--simulate", str(WORLD), "--kv-shard", mode, "--max-context", str(CONTEXT), "--no-chat-template",
            "--prefix-cache-bytes", "0", "--check-sync", "--engine-report", str(report)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=benchlib.rank_env(WORLD))
    if proc.returncode:
        raise benchlib.BenchError(proc.stderr[-3000:])
    rep = json.loads(report.read_text())
    plan = ShardPlan.build(ModelConfig.from_file(model), WORLD, compute_dtype="float32", context=CONTEXT,
                           kv=KVSettings(shard=mode))  # what each rank holds of a row
    # the audit with the most rows in the batch: what each rank held then
    audit = max(rep["audits"], key=lambda a: (len(a["reports"][0]["rows"]), sum(a["reports"][0]["row_tokens"])))
    ranks = sorted(audit["reports"], key=lambda r: r["rank"])
    return {"row_tokens": ranks[0]["row_tokens"], "batch_kv_bytes": [r["batch_kv_bytes"] for r in ranks],
            "allocated_positions": [r["allocated_tokens"] for r in ranks],
            "held_positions": [sum(plan.kv_positions(r["rank"], n) for n in r["row_tokens"]) for r in ranks],
            # this run's own capacity and the free memory it came from (the same start as serve's)
            "report_admission_capacity": rep["info"]["kv_capacity_tokens"],
            "free_bytes": [r["free_bytes"] for r in sorted(rep["info"]["ranks"], key=lambda r: r["rank"])],
            "kv_bytes_per_position": [r["kv_bytes_per_token"] for r in rep["info"]["ranks"]]}



def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(benchlib.PRESETS))
    p.add_argument("--lengths", default="1000,600,300", help="prompt tokens of the rows held together")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", type=Path, help="write the results here too")
    a = p.parse_args()
    model = benchlib.bench_model_dir(a.preset, num_key_value_heads=2)
    lengths = [int(x) for x in a.lengths.split(",")]
    out = {"machine": benchlib.machine(), "load_avg_start": benchlib.load_avg(), "world": WORLD,
           "preset": a.preset, "n_kv_heads": 2, "modes": {}}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for mode in ("replicate", "sequence"):
            cap = server_capacity(model, mode, tmp, a.timeout)
            held = held_bytes(model, mode, tmp, lengths, a.timeout)
            out["modes"][mode] = {**cap, **held}
            print(f"{mode}: admission capacity {cap['admission_capacity']:.0f} tokens, positions per rank "
                  f"{cap['positions_capacity']}, measured KV bytes per rank {held['batch_kv_bytes']} "
                  f"({held['allocated_positions']} positions allocated over all rows, {held['held_positions']} positions held, "
                  f"rows of {held['row_tokens']} tokens)", flush=True)
    out["load_avg_end"] = benchlib.load_avg()
    rep, seq = out["modes"]["replicate"], out["modes"]["sequence"]
    out["admission_ratio"] = seq["admission_capacity"] / rep["admission_capacity"]
    # capacity per byte of free memory (each run measured its own free memory at start)
    per_free = [m["report_admission_capacity"] / min(m["free_bytes"]) for m in (rep, seq)]
    out["admission_ratio_per_free_byte"] = per_free[1] / per_free[0]
    out["kv_bytes_ratio"] = [s / r for s, r in zip(seq["batch_kv_bytes"], rep["batch_kv_bytes"])]
    print(f"sequence / replicate: admission capacity x{out['admission_ratio']:.3f} "
          f"(x{out['admission_ratio_per_free_byte']:.3f} per byte of free memory), measured KV bytes per rank "
          f"x{', x'.join(f'{r:.3f}' for r in out['kv_bytes_ratio'])}; load {out['load_avg_start']:.1f} -> "
          f"{out['load_avg_end']:.1f}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
