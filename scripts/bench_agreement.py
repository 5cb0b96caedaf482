"""Cost of token agreement (rank 0's token to every rank, one 4-byte all_sum per decode
token): decode tok/s and collectives per token of this checkout against another checkout
without it (`--before DIR`, e.g. `git archive <commit> | tar -x -C DIR`), runs interleaved.

    python scripts/bench_agreement.py --before /tmp/before --preset small --world 2 --runs 3 --pin
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402


def run(tree: Path, model_dir: Path, a) -> dict:
    B.REPO, B.SCRIPTS = tree, tree / "scripts"  # rank programs import the package of that tree
    patient = ["--step-timeout", "600", "--peer-timeout", "600"]  # a loaded machine is slow, not dead
    for attempt in range(3):
        try:
            r = B.run_ours(model_dir, a.world, a.prompt, a.max_tokens, timeout=900, pin=a.pin, extra=patient)
            break
        except B.BenchError as e:
            print(f"{tree}: attempt {attempt + 1} failed: {str(e)[:300]}", file=sys.stderr, flush=True)
    else:
        raise SystemExit(f"{tree}: three failed runs")
    return {"decode_tok_s": r["timings"]["decode_tok_s"], "collectives": r["comm"]["collectives_per_token"],
            "tokens": r["tokens"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, type=Path, help="a checkout without token agreement")
    p.add_argument("--preset", default="small")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--pin", action="store_true", help="each rank on its own cores")
    a = p.parse_args()
    here = B.REPO
    model_dir = B.bench_model_dir(a.preset)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(a.runs):
        for name, tree in (("before", a.before.resolve()), ("after", here)):
            runs[name].append(run(tree, model_dir, a))
            print(f"run {i + 1} {name}: {runs[name][-1]['decode_tok_s']:.2f} tok/s, "
                  f"{runs[name][-1]['collectives']:.0f} collectives/token", file=sys.stderr, flush=True)
    same = runs["before"][0]["tokens"] == runs["after"][0]["tokens"]
    print(f"{B.machine_tag()}; preset {a.preset}, world {a.world}, {a.max_tokens} tokens, {a.runs} runs each; "
          f"same tokens before/after: {same}")
    for name, rs in runs.items():
        tps = [r["decode_tok_s"] for r in rs]
        print(f"{name}: {rs[0]['collectives']:.0f} collectives/token, decode tok/s "
              f"{', '.join(f'{t:.2f}' for t in tps)} (median {statistics.median(tps):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
