"""Speculative decoding vs plain decode: tok/s and collectives per generated token under
link emulation (--link none, tb5-ring, tb4-ring) at world 1, 2 and 4.

Modes (every speculative run is checked to produce the plain run's tokens):
- plain: no speculation.
- lookup-repeat: --prompt-lookup on a prompt that repeats itself (a random-weight target
  then repeats too: the case prompt lookup is for).
- lookup-grounded: --prompt-lookup on an input-grounded prompt ("rewrite this passage");
  a random-weight target does not copy its input, so little is accepted.
- draft: --draft-model, the `tiny` preset (same tokenizer, random weights): honest
  acceptance of an unrelated draft (about none).
- draft=target: the target as its own draft, the upper bound (everything accepted).
Beside them, mlx-lm's speculative_generate_step at world 1 on the same target/draft pair.
Greedy; the target is the `small` preset. Writes docs/bench/spec-<machine>.json.

    python scripts/bench_spec.py --pin                  # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402

REPEAT = " ".join(["the cat sat on the mat."] * 8)
GROUNDED = ("Rewrite the following passage in your own words. Passage: the quick brown fox jumps over the lazy "
            "dog while the cat sleeps on the warm mat and the birds sing about the morning sun. Rewrite: the quick "
            "brown fox")


def modes(target: Path, draft: Path, k: int) -> dict[str, tuple[str, list[str]]]:
    return {"plain": (REPEAT, []),
            "lookup-repeat": (REPEAT, ["--prompt-lookup", "3", "--num-draft", str(k)]),
            "plain-grounded": (GROUNDED, []),
            "lookup-grounded": (GROUNDED, ["--prompt-lookup", "3", "--num-draft", str(k)]),
            "draft": (REPEAT, ["--draft-model", str(draft), "--num-draft", str(k)]),
            "draft=target": (REPEAT, ["--draft-model", str(target), "--num-draft", str(k)])}


def mlxlm_worker(a) -> int:
    """World 1: mlx-lm's generate_step and speculative_generate_step on the pair (greedy)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step, speculative_generate_step
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_kvshard.models.architectures import load_oracle

    a.model, a.draft = Path(a.model), Path(a.draft)
    target, draft = load_oracle(a.model, mx.float32), load_oracle(a.draft, mx.float32)
    out = {}
    for prompt_name, prompt in (("repeat", REPEAT), ("grounded", GROUNDED)):
        ids = mx.array(load_tokenizer(a.model).encode(prompt))
        for name, gen in (("plain", lambda: generate_step(ids, target, max_tokens=a.max_tokens)),
                          ("draft", lambda: speculative_generate_step(ids, target, draft, max_tokens=a.max_tokens,
                                                                      num_draft_tokens=a.num_draft))):
            t0, tokens, drafted = time.perf_counter(), [], 0
            for i, item in enumerate(gen()):
                if i == 0:
                    t1 = time.perf_counter()  # after prefill and the first token
                tokens.append(int(item[0]))
                drafted += bool(item[2]) if len(item) > 2 else 0
            dt = time.perf_counter() - t1
            out[f"{name}-{prompt_name}"] = {"tokens": tokens, "decode_tok_s": (len(tokens) - 1) / dt,
                                            "accepted_tokens": drafted}
    print(json.dumps(out))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    B.add_common_args(p, preset="small", worlds="1,2,4", max_tokens=32, runs=1, prompt_tokens=None)
    p.add_argument("--links", default="none,tb5-ring,tb4-ring")
    p.add_argument("--num-draft", type=int, default=4)
    p.add_argument("--modes", default="", help="comma-separated subset of the modes (default: all)")
    p.add_argument("--mlxlm-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--draft", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mlxlm_worker:
        return mlxlm_worker(a)
    B.NICE = a.nice
    target, draft = B.bench_model_dir(a.preset), B.bench_model_dir("tiny")
    table = modes(target, draft, a.num_draft)
    chosen = [m for m in (a.modes.split(",") if a.modes else table)]
    results = {"machine": B.machine(), "preset": a.preset, "draft_preset": "tiny", "max_tokens": a.max_tokens,
               "num_draft": a.num_draft, "runs": []}
    out = Path(a.out) / f"spec-{a.machine_tag}.json"
    for world in [int(w) for w in a.worlds.split(",")]:
        for link in (["none"] if world == 1 else a.links.split(",")):
            plain_tokens = {}
            for mode in chosen:
                prompt, flags = table[mode]
                extra = [*flags, *(["--link", link] if link != "none" else [])]
                r = B.run_ours(target, world, prompt, a.max_tokens, a.timeout, extra, pin=a.pin)
                if mode.startswith("plain"):
                    plain_tokens[prompt] = r["tokens"]
                same = plain_tokens.get(prompt) == r["tokens"] if prompt in plain_tokens else None
                row = {"world": world, "link": link, "mode": mode, "decode_tok_s": r["timings"]["decode_tok_s"],
                       "collectives_per_generated_token": r["comm"]["collectives_per_generated_token"],
                       "speculative": r.get("speculative"), "same_tokens_as_plain": same}
                results["runs"].append(row)
                s = row["speculative"] or {}
                print(f"world {world} {link:9s} {mode:16s} {row['decode_tok_s']:7.2f} tok/s "
                      f"{row['collectives_per_generated_token']:6.2f} coll/token "
                      f"accept {s.get('acceptance_rate')} tokens/step {s.get('tokens_per_step')} same {same}",
                      flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))
    argv = [__file__, "--mlxlm-worker", "--model", str(target), "--draft", str(draft),
            "--max-tokens", str(a.max_tokens), "--num-draft", str(a.num_draft)]
    results["mlx_lm_world1"] = B.last_json(B.launch(1, argv, a.timeout, pin=a.pin))
    for name, r in results["mlx_lm_world1"].items():
        print(f"mlx-lm world 1 {name:16s} {r['decode_tok_s']:7.2f} tok/s accepted {r['accepted_tokens']}", flush=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
