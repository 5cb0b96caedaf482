"""Decode and prefill throughput, world = 1..N, side by side in one run with mlx-lm.

For each world size: ours (`mlx-kvshard generate --json` on that many local ranks),
mlx-lm single-process generation (world 1), and mlx-lm's own `Model.shard()` tensor
parallelism at the same world size where it can run (heads and MLP columns divide
evenly). Runs are interleaved (ours, mlx-lm, ours, ...) so load drift hits all alike;
each system's median-decode run is reported. Writes docs/bench/decode-<machine>.json and
the machine's table in docs/benchmarks.md.

    python scripts/bench_decode.py --pin --nice -10                # 2 cores: ~5 min (~15 unpinned under load)
    python scripts/bench_decode.py --worlds 1,2,4,8 --preset device # the 16-core machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402


def shard_can_run(cfg: dict, world: int) -> str | None:
    """Why mlx-lm's Model.shard() cannot run this world size (None: it can)."""
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if cfg[key] % world:
            return f"{key} {cfg[key]} does not divide by {world}"
    return None


def formula_bytes(cfg: dict, batch: int = 1, dtype_bytes: int = 4) -> int:
    return 2 * cfg["num_hidden_layers"] * batch * cfg["hidden_size"] * dtype_bytes


def brief(r: dict) -> dict:
    """What the JSON keeps of one run."""
    return {"timings": r["timings"], "comm": r["comm"], "load_avg": r.get("_load_avg"),
            "peak_memory_bytes": [k["peak_memory_bytes"] for k in r["ranks"]],
            "kv_bytes": [k["kv_bytes"] for k in r["ranks"]],
            "weight_bytes": [k["weight_bytes"] for k in r["ranks"]]}


def generate_has(flag: str) -> bool:
    """Whether this checkout's `generate` takes `flag` (options land while benchmarks stay)."""
    from mlx_kvshard.cli import generate as cmd_generate

    parser = argparse.ArgumentParser()
    cmd_generate.register(parser.add_subparsers())
    gen = parser._subparsers._group_actions[0].choices["generate"]
    return any(flag in act.option_strings for act in gen._actions)


def run_world(world: int, model_dir: Path, cfg: dict, prompt: str, a, tmp: Path) -> dict:
    systems = {"ours": lambda: B.run_ours(model_dir, world, prompt, a.max_tokens, a.timeout, pin=a.pin)}
    if world > 1 and a.vocab_parallel:
        # lm_head split by vocabulary rows: each rank reads 1/N of it, plus one logits all_gather
        systems["ours_vp"] = lambda: B.run_ours(model_dir, world, prompt, a.max_tokens, a.timeout,
                                                ["--vocab-parallel"], pin=a.pin)
    skipped = {}
    if world == 1:
        systems["mlx_lm"] = lambda: B.run_mlxlm(model_dir, 1, prompt, a.max_tokens, a.timeout, False, tmp / "m1")
    else:
        why = shard_can_run(cfg, world)
        if why is None:
            systems["mlx_lm_shard"] = lambda: B.run_mlxlm(model_dir, world, prompt, a.max_tokens, a.timeout,
                                                          True, tmp / f"s{world}", pin=a.pin)
        else:
            skipped["mlx_lm_shard"] = why
    runs: dict[str, list[dict]] = {k: [] for k in systems}
    tokens = {}
    for rep in range(a.runs):
        for name, fn in systems.items():
            load = B.load_avg()
            r = fn()
            r["_load_avg"] = load
            runs[name].append(r)
            tokens[name] = r["tokens"]
            t = r["timings"]
            print(f"  world {world} {name:13s} run {rep + 1}: decode {t['decode_tok_s']:.2f} tok/s, "
                  f"prefill {t['prefill_tok_s']:.1f} tok/s, TTFT {t['ttft_s']:.3f} s, "
                  f"{r['comm']['collectives_per_token']:.0f} coll/tok, load {load:.1f}", flush=True)
    out = {"skipped": skipped, "systems": {}}
    for name, rs in runs.items():
        med = B.median_run(rs)
        out["systems"][name] = {
            "median_run": brief(med),
            "decode_tok_s": B.summary(rs, "decode_tok_s"),
            "prefill_tok_s": B.summary(rs, "prefill_tok_s"),
            "ttft_s": B.summary(rs, "ttft_s"),
            "runs": [brief(r) for r in rs],
        }
    # the same greedy tokens from every system: they ran the same model on the same ids
    out["same_tokens"] = len({tuple(t) for t in tokens.values()}) == 1
    return out


def ratios(results: dict) -> dict:
    """Throughput ratios from the medians and from the best runs (on a shared machine the
    best run is the one least disturbed by other work)."""
    def get(world, name, key, stat):
        s = results.get(str(world), {}).get("systems", {}).get(name)
        return s[key][stat] if s else None

    out = {}
    for stat in ("median", "max"):
        r = {}
        for w in results:
            for mine in ("ours", "ours_vp"):
                for other, label in (("mlx_lm", "mlx_lm"), ("mlx_lm_shard", "shard")):
                    for key, short in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
                        a, b = get(w, mine, key, stat), get(w, other, key, stat)
                        if a and b:
                            r[f"world{w}_{mine}_over_{label}_{short}"] = a / b
            a, b = get(w, "ours", "decode_tok_s", stat), get(1, "ours", "decode_tok_s", stat)
            if a and b and w != "1":
                r[f"world{w}_ours_over_ours_world1_decode"] = a / b
        out["best" if stat == "max" else stat] = r
    return out


def table(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        f"**{report['machine_tag']}**: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, "
        f"{m['system']}, MLX {m['mlx']}, mlx-lm {m['mlx_lm']}, BLAS: {m['blas']}. "
        f"Run {report['date']}; load average {m['load_avg_at_start'][0]:.1f} at start"
        f"{'; ranks pinned to their own cores' if report['pinned'] else '; ranks not pinned'}"
        f"{', at nice %d' % report['nice'] if report.get('nice') else ''} (all systems alike).",
        "",
        f"Model: preset `{report['preset']}` — hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} q / {cfg['num_key_value_heads']} KV heads, intermediate "
        f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']}, {report['params'] / 1e6:.0f}M parameters, "
        f"float32 ({report['weight_gib']:.2f} GiB). Prompt {report['prompt_tokens']} tokens, "
        f"{report['max_tokens']} generated, greedy; median of {report['runs']} interleaved runs.",
        "",
    ]
    names = {"ours": "mlx-kvshard", "ours_vp": "mlx-kvshard `--vocab-parallel`", "mlx_lm": "mlx-lm (1 process)",
             "mlx_lm_shard": "mlx-lm `shard()`"}
    rows = []
    for w, res in report["results"].items():
        formula = report["formula_bytes_per_token"] if int(w) > 1 else 0
        for name, s in res["systems"].items():
            r = s["median_run"]
            t, c = r["timings"], r["comm"]
            spread = s["decode_tok_s"]
            rows.append([
                str(w), names[name], f"{t['decode_tok_s']:.2f} ({spread['min']:.2f}–{spread['max']:.2f})",
                f"{1e3 * t['time_per_output_token_s']:.1f}", f"{t['prefill_tok_s']:.1f}", f"{t['ttft_s']:.2f}",
                f"{c['collectives_per_token']:.0f}", f"{c['bytes_per_token']:.0f}",
                f"{formula}{' + logits gather' if name == 'ours_vp' else ''}",
                ", ".join(B.mib(p) for p in r["peak_memory_bytes"])])
        rows += [[str(w), names[name], f"cannot run: {why}"] + [""] * 7 for name, why in res["skipped"].items()]
    head = ["world", "system", "decode tok/s median (range)", "ms/token", "prefill tok/s", "TTFT s", "coll./token",
            "bytes/token", "formula", "peak memory per rank"]
    lines += B.markdown_table(head, "rlrrrrrrrl", rows)
    rt = report["ratios"]
    lines += ["", "Ratios of tok/s (from the medians; from the best runs):", ""]
    for k, v in rt["median"].items():
        lines.append(f"- `{k}`: {v:.2f}; best {rt['best'][k]:.2f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, preset="small", worlds="1,2,4", max_tokens=32, prompt_tokens=128)
    p.add_argument("--no-vocab-parallel", dest="vocab_parallel", action="store_false",
                   help="skip the `generate --vocab-parallel` variant at world > 1")
    a = p.parse_args()
    worlds = B.apply_common_args(a)
    a.vocab_parallel = a.vocab_parallel and generate_has("--vocab-parallel")

    t_start = time.time()
    cfg = B.preset_config(a.preset)
    print(f"building/finding the {a.preset} checkpoint ...", flush=True)
    model_dir = B.bench_model_dir(a.preset)
    prompt = B.prompt_text(model_dir, a.prompt_tokens)
    report = {
        "machine_tag": a.machine_tag, "machine": B.machine(), "date": B.timestamp(), "preset": a.preset,
        "config": cfg, "params": B.param_count(cfg), "weight_gib": 4 * B.param_count(cfg) / 2**30,
        "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens, "runs": a.runs, "pinned": a.pin, "nice": a.nice,
        "formula_bytes_per_token": formula_bytes(cfg), "formula_collectives_per_token": 2 * cfg["num_hidden_layers"],
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        for w in worlds:
            print(f"world {w}:", flush=True)
            report["results"][str(w)] = run_world(w, model_dir, cfg, prompt, a, Path(tmp))
    report["ratios"] = ratios(report["results"])
    checks = {}
    for w, res in report["results"].items():
        c = res["systems"]["ours"]["median_run"]["comm"]
        want_b = report["formula_bytes_per_token"] if int(w) > 1 else 0
        want_c = report["formula_collectives_per_token"] if int(w) > 1 else 0
        checks[w] = {"bytes_equal_formula": c["bytes_per_token"] == want_b,
                     "collectives_equal_2L": c["collectives_per_token"] == want_c,
                     "same_tokens_all_systems": res["same_tokens"]}
    report["checks"] = checks
    B.publish(a, "decode", report, table(report), t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
