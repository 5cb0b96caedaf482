"""Head sharding (TP) vs pipeline stages (PP, `--pp S`) under link emulation, side by side.

At each world size and link profile (`--link`, which makes every collective and every
stage hop cost the link's time, hardware/links.py): one-stream decode tok/s of
`generate` with TP and with `--pp N`, and aggregate tok/s of 8 concurrent requests
through the serving engine (`generate --prompts-file`) with TP and with `--pp N` (the
engine micro-batches decode-only steps: pipeline/batch.py). `--serving-only` runs
just the 8-concurrent pair (its own section, pp-serve-<machine>). The model is one whose collectives
dominate on a slow link: many thin layers (preset `tiny` with 16 layers, qwen2 layout so
mlx-lm's `--pipeline` split runs on the same weights).

Beside each measurement, the planner's prediction: the same mode's decode time with a
zero-cost link (steps serialized as under emulation; measured, it carries this machine's
compute and loopback costs) plus the planner's link time for that mode and profile
(planner/parallelism.py, capacity.predict_decode). mlx-lm's pipeline (`model.model.pipeline`)
runs at the same worlds without emulation (mlx-lm has none), beside ours without it.
Writes docs/bench/pp-<machine>.json and a section of docs/benchmarks.md.

    python scripts/bench_pp.py                        # worlds 3,4; ~15 min on 2 busy cores
    python scripts/bench_pp.py --serving-only --worlds 3 --links tb4-ring
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402

ZERO_LINK = {"name": "zero", "description": "no link cost: steps serialized as under emulation",
             "backend": "ring", "algorithm": "ring",
             "alpha_us": {"value": 1e-9, "source": "benchmark: zero-cost link"},
             "bandwidth_gbps": {"value": 1e12, "source": "benchmark: zero-cost link"}}
MODEL = dict(num_hidden_layers=16, model_type="qwen2")  # no list values: the cache folder is named from them
CONCURRENT = 8


def ours_retrying(model_dir, world, prompt, a, extra) -> dict:
    """One run; once more if the launch produced no report (mlx.launch exits 0 when a rank
    failed, e.g. a port taken by another test on a shared machine)."""
    try:
        return B.run_ours(model_dir, world, prompt, a.max_tokens, a.timeout, extra)
    except B.BenchError as e:
        print(f"retrying once: {str(e)[:200]}", file=sys.stderr, flush=True)
        return B.run_ours(model_dir, world, prompt, a.max_tokens, a.timeout, extra)


def one_stream(model_dir, world, prompt, a, mode, link) -> dict:
    extra = ["--link", link] if link else []
    if mode == "pp":
        extra += ["--pp", str(world)]
    runs = [ours_retrying(model_dir, world, prompt, a, extra) for _ in range(a.runs)]
    r = B.median_run(runs)
    return {"tok_s": r["timings"]["decode_tok_s"], "tpot_s": r["timings"]["time_per_output_token_s"],
            "runs": [x["timings"]["decode_tok_s"] for x in runs], "comm": r["comm"],
            "prompt_tokens": r["prompt_tokens"], "load_avg": B.load_avg()}


def concurrent(model_dir, world, prompt, a, link, tmp: Path, mode: str = "tp") -> dict:
    """8 requests at once through the serving engine (TP, or `--pp world`): generated tokens / wall."""
    f, rep = tmp / "lines.jsonl", tmp / f"engine-{world}-{link}-{mode}.json"
    f.write_text("".join(json.dumps({"prompt": prompt, "max_tokens": a.max_tokens}) + "\n" for _ in range(CONCURRENT)))
    argv = [sys.executable, "-m", "mlx_kvshard", "generate", "--model", str(model_dir), "--prompts-file", str(f),
            "--no-chat-template", "--dtype", "float32", "--simulate", str(world), "--link", link,
            "--engine-report", str(rep), "--prefix-cache-bytes", "0", "--step-timeout", "120"]
    if mode == "pp":
        argv += ["--pp", str(world)]
    env = dict(os.environ, PYTHONPATH=str(B.REPO))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=a.timeout * 2, env=env, cwd=B.REPO)
    if proc.returncode != 0:
        raise B.BenchError(f"engine ({mode}) at world {world} on {link} failed:\n{proc.stderr[-2000:]}")
    r = json.loads(rep.read_text())
    t = r["metrics"]["totals"]
    tokens = sorted(json.loads(ln)["tokens"] for ln in proc.stdout.splitlines() if ln.startswith("{"))
    return {"tok_s": t["generated_tokens"] / r["wall_s"], "generated": t["generated_tokens"], "wall_s": r["wall_s"],
            "link_s": t["link_s"], "steps": t["steps"], "tokens": tokens, "load_avg": B.load_avg()}


def serving_rows(model_dir, worlds, links, prompt, a, tmp: Path) -> list[dict]:
    """The 8-concurrent pair alone: TP and PP through the serving engine, side by side."""
    rows = []
    for w in worlds:
        for link in links:
            row = {"world": w, "link": link, "tp_8": concurrent(model_dir, w, prompt, a, link, tmp),
                   "pp_8": concurrent(model_dir, w, prompt, a, link, tmp, "pp")}
            row["same_tokens"] = row["tp_8"].pop("tokens") == row["pp_8"].pop("tokens")
            row["pp_over_tp_8"] = row["pp_8"]["tok_s"] / row["tp_8"]["tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def planner_link_s(cfg, world, mode, link_name, context) -> float:
    """The planner's link seconds per decode token for this mode (batch 1)."""
    from mlx_kvshard.hardware.profiles import ChipProfile, load_link
    from mlx_kvshard.pipeline.stages import StagePlan
    from mlx_kvshard.plan import ShardPlan
    from mlx_kvshard.planner.capacity import predict_decode
    from mlx_kvshard.planner.parallelism import predict_pipeline

    link = load_link(link_name)
    chip = ChipProfile("local", "this machine", 1e12, 4, (64.0,))  # only the link term is used
    if mode == "pp":
        stages = StagePlan.build(cfg, world, compute_dtype="float32")
        return predict_pipeline(stages, context, 1, link, [chip] * world, 1.0, 0.0)["link_seconds"]
    plan = ShardPlan.build(cfg, world, compute_dtype="float32")
    return predict_decode(plan, context, 1, link, chip, 1.0, 0.0)["link_seconds"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, preset="tiny", worlds="3,4", max_tokens=16, runs=1, prompt_tokens=32)
    p.add_argument("--links", default="tb4-ring,tb5-rdma")
    p.add_argument("--no-mlxlm", action="store_true", help="skip mlx-lm's pipeline runs")
    p.add_argument("--serving-only", action="store_true",
                   help="only the 8-concurrent TP vs PP pair through the serving engine (section pp-serve-<machine>)")
    a = p.parse_args()
    worlds = B.apply_common_args(a)
    links = a.links.split(",")
    from mlx_kvshard.config import ModelConfig

    t0 = time.time()
    machine = B.machine()
    model_dir = B.bench_model_dir(a.preset, **MODEL)
    cfg = ModelConfig.from_file(model_dir)
    prompt = B.prompt_text(model_dir, a.prompt_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pp-"))
    zero = tmp / "zero.json"
    zero.write_text(json.dumps(ZERO_LINK))
    rows, mlxlm = [], {}
    if a.serving_only:
        report = {"machine": machine, "preset": a.preset, "model": MODEL, "max_tokens": a.max_tokens,
                  "prompt_tokens": a.prompt_tokens, "concurrent": CONCURRENT,
                  "rows": serving_rows(model_dir, worlds, links, prompt, a, tmp), "load_avg_at_end": os.getloadavg()}
        B.publish(a, "pp-serve", report, serving_table(report, a), t0)
        return 0
    for w in worlds:
        base = {m: one_stream(model_dir, w, prompt, a, m, str(zero)) for m in ("tp", "pp")}
        loopback = one_stream(model_dir, w, prompt, a, "pp", None)
        for link in links:
            row = {"world": w, "link": link}
            for m in ("tp", "pp"):
                got = one_stream(model_dir, w, prompt, a, m, link)
                context = got["prompt_tokens"] + a.max_tokens // 2
                pred_tpot = base[m]["tpot_s"] + planner_link_s(cfg, w, m, link, context)
                row[m] = {**got, "zero_link_tpot_s": base[m]["tpot_s"], "predicted_tok_s": 1 / pred_tpot,
                          "prediction_error": (1 / pred_tpot) / got["tok_s"] - 1}
            row["tp_8"] = concurrent(model_dir, w, prompt, a, link, tmp)
            row["pp_8"] = concurrent(model_dir, w, prompt, a, link, tmp, "pp")
            row["tp_8"].pop("tokens"), row["pp_8"].pop("tokens")
            row["pp_over_tp"] = row["pp"]["tok_s"] / row["tp"]["tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not a.no_mlxlm:
            try:
                r = B.run_mlxlm(model_dir, w, prompt, a.max_tokens, a.timeout, False, tmp / f"mlxlm-{w}",
                                extra=["--pipeline"])
                mlxlm[w] = {"tok_s": r["timings"]["decode_tok_s"], "ours_pp_no_link_tok_s": loopback["tok_s"],
                            "load_avg": B.load_avg()}
            except B.BenchError as e:
                mlxlm[w] = {"error": str(e)[-300:], "ours_pp_no_link_tok_s": loopback["tok_s"]}
    report = {"machine": machine, "preset": a.preset, "model": MODEL, "max_tokens": a.max_tokens,
              "prompt_tokens": a.prompt_tokens, "runs": a.runs, "rows": rows, "mlxlm_pipeline": mlxlm,
              "load_avg_at_end": os.getloadavg()}
    B.publish(a, "pp", report, table(report, a), t0)
    return 0


def table(r: dict, a) -> str:
    m = r["machine"]
    lines = [f"TP vs PP (`--pp N`) under `--link` emulation, preset `{a.preset}` with 16 layers (qwen2 layout), "
             f"{a.prompt_tokens}-token prompt, {a.max_tokens} greedy tokens, median of {a.runs} run(s) "
             f"({B.timestamp()}; {m['cpu']}, {m['cores']} cores shared with other work: load average "
             f"{m['load_avg_at_start'][0]:.1f} at start, {r['load_avg_at_end'][0]:.1f} at end)", "",
             "| world | link | TP 1 stream tok/s (predicted) | PP 1 stream tok/s (predicted) | PP / TP | "
             "TP 8 concurrent tok/s | PP 8 concurrent tok/s |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        tp, pp = row["tp"], row["pp"]
        lines.append(f"| {row['world']} | {row['link']} | {B.fmt(tp['tok_s'])} ({B.fmt(tp['predicted_tok_s'])}) | "
                     f"{B.fmt(pp['tok_s'])} ({B.fmt(pp['predicted_tok_s'])}) | {row['pp_over_tp']:.2f}x | "
                     f"{B.fmt(row['tp_8']['tok_s'])} | {B.fmt(row['pp_8']['tok_s'])} |")
    if r["mlxlm_pipeline"]:
        lines += ["", "Without emulation (loopback ring, no link cost), one stream:", "",
                  "| world | mlx-lm pipeline tok/s | ours --pp tok/s |", "|---|---|---|"]
        for w, x in r["mlxlm_pipeline"].items():
            lines.append(f"| {w} | {B.fmt(x.get('tok_s')) if 'error' not in x else 'failed: ' + _why(x['error'])} | "
                         f"{B.fmt(x['ours_pp_no_link_tok_s'])} |")
    return "\n".join(lines)


def serving_table(r: dict, a) -> str:
    m = r["machine"]
    lines = [f"{r['concurrent']} concurrent requests through the serving engine (`generate --prompts-file`), TP vs "
             f"`--pp N` under `--link` emulation, preset `{a.preset}` with 16 layers (qwen2 layout), "
             f"{a.prompt_tokens}-token prompt, {a.max_tokens} greedy tokens each, prefix cache off; PP micro-batches "
             f"its decode-only steps (S groups in flight, up to 8 tokens per row a step; steps with prefills run "
             f"the stages in turn) ({B.timestamp()}; {m['cpu']}, {m['cores']} cores "
             f"shared with other work: load average {m['load_avg_at_start'][0]:.1f} at start, "
             f"{r['load_avg_at_end'][0]:.1f} at end)", "",
             "| world | link | TP tok/s (steps, link s) | PP tok/s (steps, link s) | PP / TP | same tokens | load |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        tp, pp = row["tp_8"], row["pp_8"]
        lines.append(f"| {row['world']} | {row['link']} | {B.fmt(tp['tok_s'])} ({tp['steps']}, {tp['link_s']:.2f}) | "
                     f"{B.fmt(pp['tok_s'])} ({pp['steps']}, {pp['link_s']:.2f}) | {row['pp_over_tp_8']:.2f}x | "
                     f"{'yes' if row['same_tokens'] else 'no'} | {tp['load_avg']:.1f} / {pp['load_avg']:.1f} |")
    return "\n".join(lines)


def _why(error: str) -> str:
    """The error's own line (e.g. 'RuntimeError: ...'), fit for a table cell."""
    lines = [ln.strip() for ln in error.splitlines() if "Error" in ln] or [error.strip()]
    return lines[-1][:100].replace("|", "/")


if __name__ == "__main__":
    raise SystemExit(main())
