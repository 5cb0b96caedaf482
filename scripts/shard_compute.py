"""One rank's share of decode compute with no collectives: `python shard_compute.py MODEL
WORLD RANK PROMPT_TOKENS MAX_TOKENS`. Loads rank RANK's slice of a WORLD-rank plan into a
process of its own (a world of one, so every all_sum is the identity: the numbers differ,
the work does not) and prints {"time_per_output_token_s": ...} as one JSON line."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from mlx_kvshard.config import ModelConfig  # noqa: E402
from mlx_kvshard.engine.dist import Comm  # noqa: E402
from mlx_kvshard.engine.generate import DecodeTimings, SamplingParams, generate_tokens  # noqa: E402
from mlx_kvshard.engine.loader import load_rank_model  # noqa: E402
from mlx_kvshard.plan import ShardPlan  # noqa: E402


def main() -> None:
    model_dir, world, rank, n_prompt, n_tokens = Path(sys.argv[1]), *map(int, sys.argv[2:6])
    cfg = ModelConfig.from_file(model_dir)
    plan = ShardPlan.build(cfg, world, compute_dtype="float32")
    comm = Comm(None)
    comm.rank = rank  # load this rank's slice; world stays 1, so no collective is issued
    model = load_rank_model(model_dir, plan, comm, mx.float32)
    prompt = [(7 * i) % 500 + 4 for i in range(n_prompt)]
    timings = DecodeTimings()
    list(generate_tokens(model, model.make_cache(), prompt, SamplingParams(max_tokens=n_tokens), 1 << 20,
                         timings=timings))
    print(json.dumps({"rank": rank, "time_per_output_token_s": timings.decode_s / max(1, timings.decode_tokens),
                      "ttft_s": timings.prefill_s}))


if __name__ == "__main__":
    main()
