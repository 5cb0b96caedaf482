"""The KV wall: quantized KV (8/4-bit) and sequence-sharded KV, measured.

Three parts (--parts):
  quality  greedy agreement over N tokens and max/mean |delta logit| (teacher-forced along the
           full-precision tokens) of 8-bit and 4-bit KV vs full precision, at world 1 and 3
  plan     per-rank KV bytes and the largest context that fits a fixed per-rank budget, for
           fp/8/4-bit KV and replicate vs sequence (the plan's formulas; no run), for the
           bench model and for Llama-3-70B 4-bit on 4 and 16 64 GB M4 Pro Macs
  speed    decode tok/s and measured KV bytes per rank (beside the plan's) at each --contexts,
           for fp/8/4-bit KV at world 1 (and mlx-lm's own QuantizedKVCache), and replicate vs
           sequence at a world of twice the KV heads

    python scripts/bench_kv.py                                  # ~10 min on 2 cores
    python scripts/bench_kv.py --parts speed --contexts 1024,4096,16384

The bench model is the `tiny` preset with head_dim 64 (so 8/4-bit KV use groups of 64).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402

BITS = [None, 8, 4]


def label(bits, dtype: str = "float32") -> str:
    return ("fp32" if dtype == "float32" else "fp16") if bits is None else f"{bits}-bit"


# ---- quality -----------------------------------------------------------------------------
def quality(a, model_dir: Path) -> list[dict]:
    rows = []
    for world in [int(w) for w in a.quality_worlds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q.json"
            B.launch(world, [str(B.SCRIPTS / "kv_quality_rank.py"), str(model_dir), str(out),
                             str(a.quality_tokens), "64"], a.timeout * 4)
            r = json.loads(out.read_text())
        for bits in ("8", "4"):
            q = r[bits]
            rows.append({"world": world, "bits": int(bits), "agreement": q["agreement"],
                         "first_divergence": q["first_divergence"], "max_abs_dlogit": q["max_abs_dlogit"],
                         "mean_abs_dlogit": q["mean_abs_dlogit"], "tokens": q["tokens"],
                         "forced_top1_agreement": q.get("forced_top1_agreement")})
        print(f"quality world {world}: " + ", ".join(
            f"{x['bits']}-bit agree {x['agreement']:.0%} max|dl| {x['max_abs_dlogit']:.3g}"
            for x in rows if x["world"] == world), flush=True)
    same = {b: [x["tokens"] for x in rows if x["bits"] == b] for b in (8, 4)}
    for x in rows:
        x["world_equals_world1"] = same[x["bits"]][0] == same[x["bits"]][-1]
    return rows


# ---- plan --------------------------------------------------------------------------------
def plan_rows(cfg, world: int, budget: int, context: int, dtype: str, modes) -> list[dict]:
    from mlx_kvshard.plan import ShardPlan
    from mlx_kvshard.settings import KVSettings

    rows = []
    for mode in modes:
        for bits in BITS:
            plan = ShardPlan.build(cfg, world, compute_dtype=dtype, context=context,
                                   kv=KVSettings(bits=bits, shard=mode))
            kv = [plan.kv_bytes(r, context) for r in range(world)]
            fit = min(plan.max_context(r, budget - plan.weight_bytes(r)) for r in range(world))
            rows.append({"world": world, "mode": plan.kv.shard, "bits": bits, "dtype": dtype,
                         "kv_bytes_max_rank": max(kv),
                         "weight_bytes_max_rank": max(plan.weight_bytes(r) for r in range(world)),
                         "largest_context": fit})
    return rows


def plan_part(a, model_dir: Path) -> dict:
    from mlx_kvshard.config import ModelConfig

    cfg = ModelConfig.from_file(model_dir)
    big_world = 2 * cfg.num_key_value_heads
    bench = plan_rows(cfg, 1, a.budget_mib * 2**20, 4096, "float32", ["replicate"])
    bench += plan_rows(cfg, big_world, a.budget_mib * 2**20, 4096, "float32", ["replicate", "sequence"])
    l70 = ModelConfig.from_dict(dict(_LLAMA3_70B, quantization={"bits": 4, "group_size": 64}))
    usable = 48 * 2**30 - 2**30  # 64 GB M4 Pro: 3/4 usable, minus 1 GiB runtime overhead
    big = plan_rows(l70, 4, usable, 32768, "float16", ["replicate"])
    big += plan_rows(l70, 16, usable, 32768, "float16", ["replicate", "sequence"])
    return {"bench": bench, "bench_budget_mib": a.budget_mib, "llama3_70b_q4": big}


_LLAMA3_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                   num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, head_dim=128,
                   tie_word_embeddings=False, torch_dtype="bfloat16", max_position_embeddings=131072)


# ---- speed -------------------------------------------------------------------------------
def one_run(a, model_dir: Path, world: int, prompt: str, extra: list[str]) -> dict:
    r = B.run_ours(model_dir, world, prompt, a.max_tokens, a.timeout * 4,
                   extra=["--max-context", str(a.max_context), *extra], pin=a.pin)
    ranks = r["ranks"]
    return {"decode_tok_s": r["timings"]["decode_tok_s"], "ttft_s": r["timings"]["ttft_s"],
            "prompt_tokens": r["prompt_tokens"], "collectives_per_token": r["comm"]["collectives_per_token"],
            "kv_bytes": [k["kv_bytes"] for k in ranks],
            "kv_bytes_allocated_by_plan": [k["kv_tokens_allocated"] * k["plan_kv_bytes_per_token"] for k in ranks],
            "kv_bytes_held": [k["kv_positions"] * k["plan_kv_bytes_per_token"] for k in ranks],
            "plan_kv_bytes": [k["plan_kv_bytes"] for k in ranks]}


def speed(a, model_dir: Path, n_kv: int) -> list[dict]:
    rows = []
    for ctx in [int(c) for c in a.contexts.split(",")]:
        prompt = B.prompt_text(model_dir, ctx - a.max_tokens)
        runs = [(1, "replicate", b) for b in BITS]
        runs += [(2 * n_kv, m, b) for m in ("replicate", "sequence") for b in (None, 8)]
        for world, mode, bits in runs:
            extra = ["--kv-shard", mode] + (["--kv-bits", str(bits)] if bits else [])
            row = {"context": ctx, "system": "ours", "world": world, "mode": mode, "bits": bits,
                   **one_run(a, model_dir, world, prompt, extra)}
            rows.append(row)
            print(f"ctx {ctx} world {world} {mode} {label(bits)}: {B.fmt(row['decode_tok_s'])} tok/s, "
                  f"KV/rank {B.mib(max(row['kv_bytes']))} (plan {B.mib(max(row['plan_kv_bytes']))} held)",
                  flush=True)
        if a.mlx_lm:
            for bits in (None, 8):
                r = B.run_mlxlm(model_dir, 1, prompt, a.max_tokens, a.timeout * 4, False,
                                Path(tempfile.mkdtemp()), extra=["--kv-bits", str(bits)] if bits else [])
                rows.append({"context": ctx, "system": "mlx-lm", "world": 1, "mode": "-", "bits": bits,
                             "decode_tok_s": r["timings"]["decode_tok_s"], "ttft_s": r["timings"]["ttft_s"],
                             "kv_bytes": [r["kv_bytes"]], "plan_kv_bytes": [None]})
    return rows


# ---- output ------------------------------------------------------------------------------
def quality_table(rows: list[dict], n: int) -> list[str]:
    out = [f"Quality vs full-precision KV (same weights, greedy, {n} tokens; |delta logit| teacher-forced "
           f"along the fp tokens):", "",
           "| world | KV | greedy agreement | first divergence | next-token agreement, same context "
           "| max abs dlogit | mean abs dlogit | = world 1 |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = r.get("forced_top1_agreement")
        out.append(f"| {r['world']} | {r['bits']}-bit | {r['agreement']:.1%} | {r['first_divergence']} | "
                   f"{'n/a' if top1 is None else f'{top1:.1%}'} | "
                   f"{r['max_abs_dlogit']:.3g} | {r['mean_abs_dlogit']:.3g} | {r['world_equals_world1']} |")
    return out + [""]


def plan_table(rows: list[dict], title: str, context: int) -> list[str]:
    out = [title, "", f"| world | KV shard | KV | weights / rank | KV / rank at {context:,} | largest context |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['world']} | {r['mode']} | {label(r['bits'], r['dtype'])} | {B.mib(r['weight_bytes_max_rank'])} | "
                   f"{B.mib(r['kv_bytes_max_rank'])} | {r['largest_context']:,} |")
    return out + [""]


def speed_table(rows: list[dict]) -> list[str]:
    out = ["| context | system | world | KV shard | KV | decode tok/s | TTFT s | KV / rank (max, allocated) "
           "| plan, held positions | vs fp, same world+mode |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((x for x in rows if x["context"] == r["context"] and x["system"] == r["system"]
                     and x["world"] == r["world"] and x["mode"] == r["mode"] and x["bits"] is None), None)
        ratio = max(r["kv_bytes"]) / max(base["kv_bytes"]) if base and r["bits"] else None
        plan = max(r["plan_kv_bytes"]) if r["plan_kv_bytes"][0] is not None else None
        out.append(f"| {r['context']:,} | {r['system']} | {r['world']} | {r['mode']} | {label(r['bits'])} | "
                   f"{B.fmt(r['decode_tok_s'])} | {B.fmt(r['ttft_s'], '.2f')} | {B.mib(max(r['kv_bytes']))} | "
                   f"{B.mib(plan)} | {B.fmt(ratio, '.3f', '')} |")
    return out + [""]


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['system']}, {m['cores']}-core {m['cpu']}, MLX {m['mlx']} CPU, {m['blas']}; "
             f"model: `{report['preset']}` preset with head_dim 64 ({report['config_line']}), float32, "
             f"{report['date']}.", ""]
    if "quality" in report:
        lines += quality_table(report["quality"], report["quality_tokens"])
    if "plan" in report:
        p = report["plan"]
        lines += plan_table(p["bench"], f"Plan, bench model, per-rank budget {p['bench_budget_mib']} MiB "
                                         f"(weights + KV):", 4096)
        lines += plan_table(p["llama3_70b_q4"], "Plan, Llama-3-70B 4-bit on 64 GB M4 Pro Macs (47 GiB for "
                                                "weights + KV per Mac), fp16 compute (the model stops at "
                                                "131,072 tokens; larger numbers show the headroom):", 32768)
    if "speed" in report:
        lines += [f"Decode ({report['max_tokens']} tokens after a prompt filling the context; one run per "
                  f"point on a shared machine):", ""] + speed_table(report["speed"])
    return "\n".join(lines)


def keep_other_parts(report: dict, path: Path) -> None:
    """A run of some --parts keeps the other parts of the last report (with their dates)."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for part in ("quality", "plan", "speed"):
        if part not in report and part in old:
            report[part] = old[part]
            report.setdefault("part_dates", {})[part] = old.get("part_dates", {}).get(part, old.get("date"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, preset="tiny", worlds="1", max_tokens=16, runs=None, prompt_tokens=None)
    p.add_argument("--parts", default="quality,plan,speed")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--quality-tokens", type=int, default=256)
    p.add_argument("--quality-worlds", default="1,3")
    p.add_argument("--budget-mib", type=int, default=48, help="per-rank memory budget of the plan part")
    p.add_argument("--max-context", type=int, default=32768)
    p.add_argument("--mlx-lm", action=argparse.BooleanOptionalAction, default=True,
                   help="also run mlx-lm's own generation with its QuantizedKVCache (world 1)")
    a = p.parse_args()
    B.apply_common_args(a)
    t0 = time.time()
    cfg = B.preset_config(a.preset, head_dim=64, max_position_embeddings=a.max_context)
    model_dir = B.bench_model_dir(a.preset, head_dim=64, max_position_embeddings=a.max_context)
    parts = a.parts.split(",")
    report = {"machine_tag": a.machine_tag, "machine": B.machine(), "date": B.timestamp(), "preset": a.preset,
              "config": cfg, "max_tokens": a.max_tokens, "quality_tokens": a.quality_tokens,
              "config_line": f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                             f"{cfg['num_attention_heads']} query / {cfg['num_key_value_heads']} KV heads"}
    if "plan" in parts:
        report["plan"] = plan_part(a, model_dir)
    if "quality" in parts:
        report["quality"] = quality(a, model_dir)
    if "speed" in parts:
        report["speed"] = speed(a, model_dir, cfg["num_key_value_heads"])
    keep_other_parts(report, Path(a.out) / f"kv-{a.machine_tag}.json")
    B.publish(a, "kv", report, render(report), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
