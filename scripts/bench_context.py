"""Context-length sweep: per-token communication stays flat while KV bytes per rank
fall as 1/N.

For each context and world size, one `mlx-kvshard generate --json` run whose prompt
fills the context. Reads, from the run itself: bytes and collectives per decode token
(counted where issued) and each rank's KV cache bytes. Beside them, what a design that
all-gathers the KV cache every token would move (the planner's formula). Writes
docs/bench/context-<machine>.json, a PNG plot when matplotlib is installed (an optional,
script-only dependency: `pip install matplotlib`), and a table in docs/benchmarks.md.

    python scripts/bench_context.py                       # tiny preset, ~3 min on 2 cores
    python scripts/bench_context.py --preset small --worlds 1,2,4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402


def kv_allgather_bytes(model_dir: Path, world: int, context: int) -> float:
    """Wire bytes per rank per token if the KV cache were all-gathered each token."""
    from mlx_kvshard.planner.capacity import Options, comm_per_token
    from mlx_kvshard.config import ModelConfig
    from mlx_kvshard.plan import ShardPlan

    plan = ShardPlan.build(ModelConfig.from_file(model_dir), world, compute_dtype="float32")
    return comm_per_token(plan, Options(context=context))["kv_allgather"]["wire_bytes_per_rank_per_token"]


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    rows = report["rows"]
    worlds = sorted({r["world"] for r in rows})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "os^vD"
    for i, w in enumerate(worlds):
        rs = [r for r in rows if r["world"] == w]
        ctx = [r["context"] for r in rs]
        m = markers[i % len(markers)]
        if w > 1:  # equal at every world size: later lines are drawn thinner so all show
            a.plot(ctx, [r["bytes_per_token"] for r in rs], m + "-", lw=3 - 0.8 * i, ms=9 - 2 * i,
                   label=f"head-sharded, world {w} (measured)")
            a.plot(ctx, [r["kv_allgather_bytes_per_token"] for r in rs], m + "--",
                   label=f"KV all-gather, world {w} (formula)")
        b.plot(ctx, [r["kv_bytes_max_rank"] / 2**20 for r in rs], m + "-", label=f"world {w}")
    a.set(yscale="log", ylabel="bytes per decode token per rank", title="Communication per decode token")
    b.set(yscale="log", ylabel="KV cache per rank (MiB, measured)", title="KV cache bytes per rank")
    contexts = sorted({r["context"] for r in rows})
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['preset']} preset on {report['machine_tag']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def table(report: dict, png: str | None) -> str:
    cfg = report["config"]
    lines = [
        f"Preset `{report['preset']}` (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} q / {cfg['num_key_value_heads']} KV heads, float32) on "
        f"{report['machine_tag']}, {report['date']}; {report['max_tokens']} generated tokens per run. "
        f"Formula bytes/token at world > 1: 2·L·B·hidden·4 = {report['formula_bytes_per_token']}.",
        "",
    ]
    head = ["context", "world", "prompt tokens", "coll./token", "bytes/token (measured)",
            "KV all-gather bytes/token (formula)", "KV bytes per rank (measured)", "max rank vs world 1"]
    lines += B.markdown_table(head, "rrrrrrlr", [
        [str(r["context"]), str(r["world"]), str(r["prompt_tokens"]), f"{r['collectives_per_token']:.0f}",
         f"{r['bytes_per_token']:.0f}", f"{r['kv_allgather_bytes_per_token']:.0f}",
         ", ".join(B.mib(x) for x in r["kv_bytes"]), f"{r['kv_fraction_of_world1']:.3f}"] for r in report["rows"]])
    if png:
        lines += ["", f"![context sweep]({png})"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, preset="tiny", worlds="1,2,4", max_tokens=4, runs=None, prompt_tokens=None)
    p.add_argument("--contexts", default="256,512,1024,2048,4096")
    a = p.parse_args()
    worlds = B.apply_common_args(a)
    contexts = [int(c) for c in a.contexts.split(",")]

    t0 = time.time()
    cfg = B.preset_config(a.preset)
    model_dir = B.bench_model_dir(a.preset)
    L, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    report = {"machine_tag": a.machine_tag, "machine": B.machine(), "date": B.timestamp(), "preset": a.preset,
              "config": cfg, "max_tokens": a.max_tokens, "formula_bytes_per_token": 2 * L * hidden * 4,
              "rows": []}
    world1_kv = {}
    for ctx in contexts:
        prompt = B.prompt_text(model_dir, ctx - a.max_tokens)
        for w in worlds:
            r = B.run_ours(model_dir, w, prompt, a.max_tokens, a.timeout, pin=a.pin)
            kv = [k["kv_bytes"] for k in r["ranks"]]
            # bytes the cache holds for the tokens it has (allocation grows in 256-token steps)
            kv_used = [k["kv_tokens"] * k["plan_kv_bytes_per_token"] for k in r["ranks"]]
            if w == 1:
                world1_kv[ctx] = max(kv_used)
            row = {
                "context": ctx, "world": w, "prompt_tokens": r["prompt_tokens"],
                "collectives_per_token": r["comm"]["collectives_per_token"],
                "bytes_per_token": r["comm"]["bytes_per_token"],
                "kv_allgather_bytes_per_token": kv_allgather_bytes(model_dir, w, r["prompt_tokens"] + a.max_tokens),
                "kv_bytes": kv, "kv_bytes_used": kv_used, "kv_bytes_max_rank": max(kv),
                "kv_heads_per_rank": [k["local_kv_heads"] for k in r["ranks"]],
                "kv_fraction_of_world1": max(kv_used) / world1_kv[ctx] if ctx in world1_kv else None,
                "decode_tok_s": r["timings"]["decode_tok_s"], "ttft_s": r["timings"]["ttft_s"],
            }
            report["rows"].append(row)
            print(f"context {ctx:5d} world {w}: {row['bytes_per_token']:.0f} B/token "
                  f"({row['collectives_per_token']:.0f} coll.), KV per rank "
                  f"{', '.join(B.mib(x) for x in kv)}, all-gather would be "
                  f"{row['kv_allgather_bytes_per_token']:.0f} B/token", flush=True)
    flat = {w: sorted({r["bytes_per_token"] for r in report["rows"] if r["world"] == w}) for w in worlds}
    report["checks"] = {
        "bytes_per_token_flat_over_context": all(len(v) == 1 for v in flat.values()),
        "bytes_per_token_equal_formula": all(
            r["bytes_per_token"] == (report["formula_bytes_per_token"] if r["world"] > 1 else 0)
            for r in report["rows"]),
    }
    png = Path(a.out) / f"context-{a.machine_tag}.png"
    have_png = plot(report, png)
    B.publish(a, "context", report, table(report, f"bench/{png.name}" if have_png else None), t0)
    print(f"checks: {report['checks']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
