"""Where a decode token's time goes at world 2 and 4 on this machine.

For each world size N, each measured on its own (medians of --runs):
- world 1: the whole model in one process (the time to get back to);
- shard alone: rank 0's slice (the largest) decoding in one process with the threads a
  rank gets (cores / N), no collectives: the matmuls and attention a rank does;
- shards at once: all N slices decoding in N independent processes at the same time, no
  collectives: what sharing the cores and the memory bus costs (thread contention);
- all_sums alone: 2·L dependent all_sums of a hidden-size activation on the loopback
  ring, no compute: the collectives' own latency;
- world N: the real run (`generate --json`), steps pipelined as usual;
- world N serialized: the same with a zero-cost --link, which evaluates each step before
  building the next: what overlapping the host's graph building (the host sync) saves.
The remainder, world N - shards at once - all_sums alone, is time spent waiting in
collectives for a slower peer and the ring's polling threads competing with compute.
Every row is measured unpinned and with each rank pinned to its own cores
(scripts/rank_setup.py). Writes docs/bench/breakdown-<machine>.json and a table.

    python scripts/bench_breakdown.py            # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as B  # noqa: E402
from bench_link import ZERO_LINK  # noqa: E402


def shards_at_once(model_dir: Path, world: int, ranks: list[int], a, pin: bool) -> float:
    """Slowest time per output token of `ranks`' slices decoding at the same time."""
    procs = []
    for r in ranks:
        argv = [str(B.SCRIPTS / "shard_compute.py"), str(model_dir), str(world), str(r),
                str(a.prompt_tokens), str(a.max_tokens)]
        if pin or B.NICE:
            argv = [str(B.SCRIPTS / "rank_setup.py"), str(world), str(int(pin)), str(B.NICE), *argv]
        env = B.rank_env(world)
        env["MLX_RANK"] = str(r)  # read by rank_setup only: these processes form no group
        procs.append(subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=B.REPO))
    times = []
    for pr in procs:
        out, err = pr.communicate(timeout=a.timeout)
        if pr.returncode != 0:
            raise B.BenchError(f"shard_compute failed:\n{err[-2000:]}")
        times.append(B.last_json(out)["time_per_output_token_s"])
    return max(times)


def median_of(fn, runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_args(p, preset="small", worlds="2,4", max_tokens=16, runs=2)
    a = p.parse_args()
    worlds = B.apply_common_args(a)

    t0 = time.time()
    cfg = B.preset_config(a.preset)
    L, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    model_dir = B.bench_model_dir(a.preset)
    prompt = B.prompt_text(model_dir, a.prompt_tokens)
    zero = Path(tempfile.mkdtemp(prefix="bench-breakdown-")) / "zero.json"
    zero.write_text(json.dumps(ZERO_LINK))

    def ours(world, pin, extra=()):
        return B.run_ours(model_dir, world, prompt, a.max_tokens, a.timeout, list(extra),
                          pin=pin)["timings"]["time_per_output_token_s"]

    def allsums(world, pin):
        out = B.launch(world, [str(B.SCRIPTS / "allsum_rank.py"), str(hidden), str(2 * L), "30"], a.timeout, pin=pin)
        return B.last_json(out)["per_token_s"]

    report = {"machine_tag": a.machine_tag, "machine": B.machine(), "date": B.timestamp(), "preset": a.preset,
              "config": cfg, "nice": a.nice, "runs": a.runs, "max_tokens": a.max_tokens, "prompt_tokens": a.prompt_tokens,
              "world1_s": median_of(lambda: ours(1, False), a.runs), "worlds": {}}
    print(f"world 1: {1e3 * report['world1_s']:.1f} ms/token", flush=True)
    for w in worlds:
        res = {}
        for pin in (False, True):
            key = "pinned" if pin else "unpinned"
            row = {
                "shard_alone_s": shards_at_once(model_dir, w, [0], a, pin),
                "shards_at_once_s": median_of(lambda: shards_at_once(model_dir, w, list(range(w)), a, pin), a.runs),
                "allsums_alone_s": median_of(lambda: allsums(w, pin), a.runs),
                "world_s": median_of(lambda: ours(w, pin), a.runs),
                "world_serialized_s": median_of(lambda: ours(w, pin, ["--link", str(zero)]), a.runs),
            }
            row["remainder_s"] = row["world_s"] - row["shards_at_once_s"] - row["allsums_alone_s"]
            res[key] = row
            print(f"world {w} {key}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in row.items()), flush=True)
        report["worlds"][str(w)] = res
    B.publish(a, "breakdown", report, table(report), t0)
    return 0


ROWS = [
    ("shard_alone_s", "rank 0's slice alone, no collectives (its matmuls + attention)"),
    ("shards_at_once_s", "all N slices at once, no collectives (+ core/bus sharing)"),
    ("allsums_alone_s", "2·L all_sums alone on the loopback ring (no compute)"),
    ("remainder_s", "remainder: waiting on peers, ring pollers vs compute"),
    ("world_s", "**world N decode step (measured)**"),
    ("world_serialized_s", "world N with steps serialized (no host-sync overlap)"),
]


def table(report: dict) -> str:
    cores = report["machine"]["cores"]
    lines = [f"Preset `{report['preset']}`, {report['machine_tag']}, {report['date']}"
             f"{', every rank at nice %d' % report['nice'] if report.get('nice') else ''}; ms per decode token, "
             f"medians of {report['runs']}. World 1 (whole model, one process, {cores} BLAS threads): "
             f"**{1e3 * report['world1_s']:.1f} ms**.", ""]
    head = [""] + [f"world {w} {pin}" for w in report["worlds"] for pin in ("unpinned", "pinned")]
    rows = [[label] + [f"{1e3 * res[pin][key]:.1f}" for res in report["worlds"].values()
                       for pin in ("unpinned", "pinned")] for key, label in ROWS]
    lines += B.markdown_table(head, "l" + "r" * (len(head) - 1), rows)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
