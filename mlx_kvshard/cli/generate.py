"""`mlx-kvshard generate`: run one prompt on this rank (under a launcher) or on N
simulated local ranks (`--simulate N`)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from ..launch import restart

from ..liveness import checkpoint as gencheckpoint, client as liveness
from ..errors import UserError
from ..engine.generate import SamplingParams
from ..settings import KV_SHARD_MODES, KVSettings


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", default="tiny", help="local HF-format directory, hub id, or 'tiny' (embedded, default)")
    p.add_argument("--prompt", default="Hello", help="prompt text ('-' reads standard input)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--repetition-context-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-context", type=int, default=None,
                   help="max prompt + generated tokens (default: the model's max_position_embeddings)")
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto"], default=None,
                   help="compute dtype (default: float32 on Linux CPU, the checkpoint's on macOS)")
    p.add_argument("--weights", help="per-rank weights for the shard split, e.g. memory in GB: 64,24,16")
    p.add_argument("--vocab-parallel", action="store_true",
                   help="split lm_head by vocabulary rows across ranks (one logits all_gather per token)")
    p.add_argument("--kv-bits", type=int, choices=(8, 4), default=None,
                   help="store each rank's KV cache quantized to 8 or 4 bits (default: the compute dtype)")
    p.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=64,
                   help="head_dim elements per KV quantization scale and bias (default 64)")
    p.add_argument("--kv-quant-start", type=int, default=0, metavar="T",
                   help="with --kv-bits: keep the cache in full precision until it holds T tokens, "
                        "then quantize it (as mlx-lm's quantized_kv_start)")
    p.add_argument("--kv-shard", choices=KV_SHARD_MODES, default="replicate",
                   help="more ranks than KV heads: replicate a shared head's cache on its ranks, split it "
                        "by sequence position (KV per rank = total / N), or auto (less memory per rank "
                        "at --max-context)")
    p.add_argument("--backend", default="any", help="MLX distributed backend (ring, jaccl, any)")
    p.add_argument("--check-sync", action="store_true",
                   help="debug: verify every rank holds the identical token sequence")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--stats", action="store_true", help="print a run summary (timings, memory, traffic) to stderr")
    p.add_argument("--link", metavar="PROFILE",
                   help="simulation: make each collective cost a link profile's time (configs/links)")
    p.add_argument("--simulate", type=int, metavar="N", help="start N local ranks (ring on 127.0.0.1)")
    gencheckpoint.add_arguments(p)
    liveness.add_arguments(p)
    restart.add_arguments(p)
    p.set_defaults(func=run, _parser=p)


def sampling_params(args) -> SamplingParams:
    params = SamplingParams(
        max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size, seed=args.seed, stop=tuple(args.stop),
    )
    params.validate()
    if args.prefill_step < 1:
        raise UserError(f"--prefill-step {args.prefill_step}: must be at least 1")
    if args.max_context is not None and args.max_context < 2:
        raise UserError(f"--max-context {args.max_context}: must be at least 2")
    return params


def kv_settings(args) -> KVSettings:
    kv = KVSettings(bits=args.kv_bits, group_size=args.kv_group_size, quant_start=args.kv_quant_start,
                    shard=args.kv_shard)
    kv.check()
    return kv


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    params = sampling_params(args)
    kv_settings(args)
    gencheckpoint.check_arguments(args)
    liveness.check_arguments(args)
    restart.check_arguments(args)
    if args.restart and args.simulate is None:
        raise UserError("--restart relaunches ranks: use it with --simulate N (or on `mlx-kvshard launch`)")
    if args.simulate is not None:
        return simulate(args)
    from ..engine.rank import run_rank

    return run_rank(args, params)


def default_dtype(requested: str | None) -> str:
    if requested:
        return requested
    # MLX's Linux build runs on the CPU, where half precision is slow and drifts.
    return "float32" if platform.system() == "Linux" else "auto"


def to_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: set[str]) -> list[str]:
    """The options in `args` that differ from their defaults, as command-line words."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def simulate(args: argparse.Namespace) -> int:
    """Check what can be checked once, build the model once, then start the ranks."""
    from ..launch.simulate import run_local

    from ..engine.rank import prepare_prompt

    if args.simulate < 1:
        raise UserError(f"--simulate {args.simulate}: need at least 1 rank")
    ck = None
    if args.resume:  # a corrupt or mismatched checkpoint fails here, before any rank starts
        ck = gencheckpoint.read(args.resume)
        gencheckpoint.apply_checkpoint(ck, args, args._parser)
    model_dir, cfg, _tok, _ids, _ctx = prepare_prompt(args, ck)  # fails fast before any rank starts
    kv_settings(args).check(cfg.head_dim)
    args.model = str(model_dir)
    args.dtype = default_dtype(args.dtype)
    rank_args = ["generate", *to_argv(args._parser, args, skip={"simulate", "restart", "exclude"})]

    def once(hosts: list[str], rank_args: list[str]) -> restart.Attempt:
        return restart.supervise(hosts, lambda env: run_local(len(hosts), rank_args, env=env),
                                 args.peer_timeout, args.step_timeout)

    def say(text: str) -> None:
        print(f"mlx-kvshard: {text}", file=sys.stderr, flush=True)

    return restart.run_with_restarts(once, ["127.0.0.1"] * args.simulate, rank_args, args.restart,
                                     args.exclude, say)

