"""`mlx-kvshard plan`: print what each rank would own, without loading weights."""

from __future__ import annotations

import argparse
import json

from .config import ModelConfig
from .errors import UserError
from .plan import ShardPlan


def register(sub) -> None:
    p = sub.add_parser("plan", help="print the shard plan per rank (reads config.json only)")
    p.add_argument("--model", required=True, help="local model directory, HF hub id, or 'tiny'")
    p.add_argument("--world", type=int, required=True, help="number of ranks")
    p.add_argument("--weights", help="comma-separated per-rank weights, e.g. memory in GB: 64,24,16")
    p.add_argument("--dtype", default=None, help="compute/KV dtype (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def parse_weights(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text!r}: expected comma-separated numbers like 64,24,16") from None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .resolve import resolve_config_path

    cfg = ModelConfig.from_file(resolve_config_path(args.model))
    plan = ShardPlan.build(cfg, args.world, parse_weights(args.weights), compute_dtype=args.dtype)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0
