"""The planner's decode prediction against link-emulated runs on this machine.

Method (all numbers measured in this one run):
1. Calibrate the compute term on world 1: `generate --link <profile>` at world 1 issues
   no collectives but runs the steps serialized as every emulated run does. The planner's
   bytes read per decode token (weights + KV at the mean decode context) divided by the
   measured time per output token is this machine's achieved decode bandwidth BW.
2. A local chip profile: simulated ranks share one machine (cores and memory bus), so each
   rank's chip gets BW / world.
3. For each link profile and world size: `capacity.predict_decode(plan, context, 1, link,
   chip, eta=1, t_fixed=0)` against the measured time per output token of
   `generate --link <profile>` on that many local ranks; error = predicted / measured - 1.
4. Beside it, the same world with a zero-cost link (steps serialized, no owed time): what
   loopback collectives and rank contention cost on this machine, which the planner does
   not model (on a cluster the link is the collective; here the emulated time is added on
   top of a real loopback one), and the link time the emulated run added over it.
Writes docs/bench/link-<machine>.json and a table in docs/benchmarks.md.

    python scripts/bench_link.py                 # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402

ZERO_LINK = {
    "name": "zero", "description": "no link cost: steps serialized as under emulation, nothing owed",
    "backend": "ring", "algorithm": "ring",
    "alpha_us": {"value": 1e-9, "source": "benchmark: zero-cost link"},
    "bandwidth_gbps": {"value": 1e12, "source": "benchmark: zero-cost link"},
}


def measure(model_dir, world, prompt, a, link_arg) -> dict:
    runs = [B.run_ours(model_dir, world, prompt, a.max_tokens, a.timeout, ["--link", link_arg], pin=a.pin)
            for _ in range(a.runs)]
    tpot = [r["timings"]["time_per_output_token_s"] for r in runs]
    return {"time_per_output_token_s": statistics.median(tpot), "runs": tpot,
            "comm": runs[0]["comm"], "prompt_tokens": runs[0]["prompt_tokens"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, preset="small", worlds="2,3", max_tokens=24)
    p.add_argument("--links", default="tb4-ring,tb5-rdma,10gbe")
    a = p.parse_args()
    worlds = B.apply_common_args(a)
    links = a.links.split(",")

    from mlx_kvshard.planner.capacity import allreduce_seconds, predict_decode, weight_bytes_read_per_token
    from mlx_kvshard.config import ModelConfig
    from mlx_kvshard.plan import ShardPlan
    from mlx_kvshard.hardware.profiles import ChipProfile, load_link

    t0 = time.time()
    model_dir = B.bench_model_dir(a.preset)
    cfg = ModelConfig.from_file(model_dir)
    prompt = B.prompt_text(model_dir, a.prompt_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="bench-link-"))
    zero = tmp / "zero.json"
    zero.write_text(json.dumps(ZERO_LINK))

    # 1. calibration: world 1, serialized steps
    cal = measure(model_dir, 1, prompt, a, str(zero))
    context = cal["prompt_tokens"] + a.max_tokens // 2  # mean KV length over the decode
    plan1 = ShardPlan.build(cfg, 1, compute_dtype="float32")
    from mlx_kvshard.planner.capacity import kv_bytes

    read1 = weight_bytes_read_per_token(plan1, 0) + kv_bytes(plan1, 0, context)
    bw = read1 / cal["time_per_output_token_s"]
    print(f"world 1: {1e3 * cal['time_per_output_token_s']:.1f} ms/token for {read1 / 2**20:.0f} MiB read "
          f"-> achieved {bw / 1e9:.2f} GB/s", flush=True)
    report = {"machine_tag": a.machine_tag, "machine": B.machine(), "date": B.timestamp(), "preset": a.preset,
              "config": B.preset_config(a.preset), "pinned": a.pin, "nice": a.nice, "runs_per_point": a.runs,
              "max_tokens": a.max_tokens, "context_mean": context,
              "calibration": {**cal, "bytes_read_per_token": read1, "achieved_bandwidth_Bps": bw},
              "rows": []}
    for w in worlds:
        plan = ShardPlan.build(cfg, w, compute_dtype="float32")
        chip = ChipProfile(name=f"local/{w}", description="this machine's achieved decode bandwidth, shared by "
                           f"{w} ranks", mem_bandwidth_Bps=bw / w, thunderbolt=0, memory_options_gb=())
        base = measure(model_dir, w, prompt, a, str(zero))
        print(f"world {w} zero-cost link: {1e3 * base['time_per_output_token_s']:.1f} ms/token", flush=True)
        for name in links:
            link = load_link(name)
            m = measure(model_dir, w, prompt, a, name)
            pred = predict_decode(plan, context, 1, link, chip, eta=1.0, t_fixed=0.0)
            meas = m["time_per_output_token_s"]
            row = {
                "world": w, "link": name,
                "measured_s": meas, "measured_runs_s": m["runs"],
                "predicted_s": pred["seconds_per_token"],
                "error": pred["seconds_per_token"] / meas - 1,
                "predicted_memory_s": pred["memory_seconds"], "predicted_link_s": pred["link_seconds"],
                "allreduce_s": allreduce_seconds(link, w, cfg.hidden_size * 4),
                "zero_link_s": base["time_per_output_token_s"],
                "loopback_overhead_s": base["time_per_output_token_s"] - cal["time_per_output_token_s"],
                "emulated_link_added_s": meas - base["time_per_output_token_s"],
                "collectives_per_token": m["comm"]["collectives_per_token"],
                "bytes_per_token": m["comm"]["bytes_per_token"],
            }
            report["rows"].append(row)
            print(f"world {w} {name:9s}: measured {1e3 * meas:.1f} ms, predicted {1e3 * row['predicted_s']:.1f} ms "
                  f"({100 * row['error']:+.0f}%): memory {1e3 * row['predicted_memory_s']:.1f} + link "
                  f"{1e3 * row['predicted_link_s']:.2f}; emulation added {1e3 * row['emulated_link_added_s']:.2f} ms "
                  f"over zero-link", flush=True)
    report["max_abs_error"] = max(abs(r["error"]) for r in report["rows"])
    B.publish(a, "link", report, table(report), t0)
    return 0


def table(report: dict) -> str:
    c = report["calibration"]
    lines = [
        f"Preset `{report['preset']}`, {report['machine_tag']}, {report['date']}"
        f"{', ranks pinned to cores' if report['pinned'] else ''}"
        f"{', nice %d' % report['nice'] if report.get('nice') else ''}; median of {report['runs_per_point']} runs "
        f"of {report['max_tokens']} tokens. Calibration (world 1, steps serialized): "
        f"{1e3 * c['time_per_output_token_s']:.1f} ms/token for {c['bytes_read_per_token'] / 2**20:.0f} MiB read "
        f"per token = **{c['achieved_bandwidth_Bps'] / 1e9:.2f} GB/s** achieved; each of N simulated ranks "
        f"gets 1/N of it.",
        "",
    ]
    head = ["world", "link", "all_sum (profile)", "predicted ms/token (memory + link)", "measured ms/token", "error",
            "zero-cost link ms/token", "emulation added ms (predicted link ms)"]
    lines += B.markdown_table(head, "rlrrrrrr", [
        [str(r["world"]), r["link"], f"{1e6 * r['allreduce_s']:.0f} µs",
         f"{1e3 * r['predicted_s']:.1f} ({1e3 * r['predicted_memory_s']:.1f} + {1e3 * r['predicted_link_s']:.2f})",
         f"{1e3 * r['measured_s']:.1f}", f"{100 * r['error']:+.0f}%", f"{1e3 * r['zero_link_s']:.1f}",
         f"{1e3 * r['emulated_link_added_s']:.2f} ({1e3 * r['predicted_link_s']:.2f})"] for r in report["rows"]])
    lines += ["", f"Largest |error|: {100 * report['max_abs_error']:.0f}% (target: within 25%)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
