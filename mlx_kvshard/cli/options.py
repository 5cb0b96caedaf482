"""Flags and typed settings shared by the rank commands (`generate`, `serve`): the model,
how it and its KV cache are sharded and stored, liveness, and starting N simulated ranks
under the coordinator."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..launch import restart
from ..settings import (DEFAULT_PEER_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S, DTYPES, KV_ROTATE_MODES, KV_SHARD_MODES,
                        KVSettings, LivenessSettings, ModelSettings, RankSettings, ShardingSettings, parse_shares)


def add_model_arguments(p) -> None:
    p.add_argument("--model", default="tiny", help="local HF-format directory, a .gguf file, hub id, or 'tiny' (embedded, default)")
    p.add_argument("--max-context", type=int, default=None,
                   help="max prompt + generated tokens (default: the model's max_position_embeddings)")
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk (or engine step)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: float32 on Linux CPU, the checkpoint's on macOS)")
    # dest stays "weights": launch/fit.py reads the rank command's namespace by that name
    p.add_argument("--shares", "--weights", dest="weights", metavar="SHARES",
                   help="per-rank shares of the split, e.g. memory in GB: 64,24,16 (--weights: old spelling)")
    p.add_argument("--vocab-parallel", action="store_true",
                   help="split lm_head by vocabulary rows across ranks (one logits all_gather per token)")
    p.add_argument("--backend", default="any", help="MLX distributed backend (ring, jaccl, any)")
    p.add_argument("--link", metavar="PROFILE",
                   help="simulation: make each collective cost a link profile's time (configs/links)")
    p.add_argument("--simulate", type=int, metavar="N", help="start N local ranks (ring on 127.0.0.1)")
    p.add_argument("--pp", type=int, default=1, metavar="S",
                   help="pipeline: split the layers into S contiguous stages, one rank each (world = S), "
                        "weighted by --shares; one activation per stage boundary per token (serve, --prompts-file: "
                        "decode-only steps micro-batched, S groups of rows in flight)")
    add_kv_arguments(p.add_argument_group("KV cache"))


def add_kv_arguments(p) -> None:
    """How each rank stores its KV cache. The serving engine takes them all (--kv-quant-start
    not with sequence-sharded KV, which it refuses at start)."""
    p.add_argument("--kv-bits", type=int, choices=(8, 4), default=None,
                   help="store each rank's KV cache quantized to 8 or 4 bits (default: the compute dtype)")
    p.add_argument("--kv-group-size", type=int, choices=(32, 64, 128), default=64,
                   help="head_dim elements per KV quantization scale and bias (default 64)")
    p.add_argument("--kv-quant-start", type=int, default=0, metavar="T",
                   help="with --kv-bits: keep the cache in full precision until it holds T tokens, "
                        "then quantize it (as mlx-lm's quantized_kv_start; per sequence in the serving engine)")
    p.add_argument("--kv-fp-window", type=int, default=None, metavar="W",
                   help="with --kv-bits: keep each sequence's last W positions in full precision, quantize "
                        "older ones (0: none; default: per bit width, see docs/kv-quality.md)")
    p.add_argument("--kv-shard", choices=KV_SHARD_MODES, default="replicate",
                   help="more ranks than KV heads: replicate a shared head's cache on its ranks, split it "
                        "by sequence position (KV per rank = total / N), or auto (less memory per rank "
                        "at --max-context)")
    p.add_argument("--kv-rotate", choices=tuple(KV_ROTATE_MODES), default="auto",
                   help="Hadamard-rotate each head's q, k, v before the cache and the output back: attention is "
                        "unchanged, outliers are spread before quantizing (auto: on where measured to win, "
                        "see docs/kv-quality.md)")


def add_liveness_arguments(p) -> None:
    p.add_argument("--peer-timeout", type=float, default=DEFAULT_PEER_TIMEOUT_S, metavar="S",
                   help="a rank silent on the side channel for S seconds is declared lost (needs a "
                        f"coordinator: --simulate or the launcher; default {DEFAULT_PEER_TIMEOUT_S:g})")
    p.add_argument("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT_S, metavar="S",
                   help="a step taking longer than S seconds stops every rank "
                        f"(default {DEFAULT_STEP_TIMEOUT_S:g})")
    add_restart_arguments(p)


def add_restart_arguments(p) -> None:
    p.add_argument("--restart", type=int, default=0, metavar="N",
                   help="after a rank is lost, relaunch up to N times (generate resumes from its last checkpoint; "
                        "serve moves the requests in flight to the new group)")
    p.add_argument("--exclude", action="append", default=[], metavar="HOST",
                   help=f"leave HOST out of relaunches ('{restart.FAILED}': the lost rank's host); repeatable")


def check_restart_arguments(args: argparse.Namespace, rank_ns: argparse.Namespace | None = None) -> None:
    """`rank_ns`: under `mlx-kvshard launch`, the parsed rank command."""
    if args.restart < 0:
        raise UserError(f"--restart {args.restart}: must be 0 or a number of relaunches")
    if args.exclude and not args.restart:
        raise UserError("--exclude applies to relaunches: give --restart N as well")
    if args.restart and rank_ns is not None and liveness_timeouts(rank_ns) is None:
        raise UserError(f"--restart relaunches generate or serve: the rank command is "
                        f"{getattr(rank_ns, 'command', None)}")


def liveness_timeouts(rank_ns: argparse.Namespace) -> tuple[float, float] | None:
    """(peer, step) timeouts when the rank command keeps a liveness side channel, else None."""
    if getattr(rank_ns, "command", None) not in ("generate", "serve"):
        return None
    return rank_ns.peer_timeout, rank_ns.step_timeout


def rank_settings(args: argparse.Namespace) -> RankSettings:
    """The model, sharding and liveness settings every rank command has (validated)."""
    settings = RankSettings(
        model=ModelSettings(args.model, args.dtype, args.max_context, args.prefill_step),
        sharding=ShardingSettings(parse_shares(args.weights, "--shares"), args.vocab_parallel, args.backend,
                                  args.link, args.pp),
        kv=kv_settings(args),
        liveness=LivenessSettings(args.peer_timeout, args.step_timeout),
    )
    settings.validate()
    check_restart_arguments(args)
    if args.restart and args.simulate is None:
        raise UserError("--restart relaunches ranks: use it with --simulate N (or on `mlx-kvshard launch`)")
    if args.simulate is not None and args.simulate < 1:
        raise UserError(f"--simulate {args.simulate}: need at least 1 rank")
    if args.simulate is not None:
        from ..pipeline.stages import check_world

        check_world(args.pp, args.simulate)
    return settings


def kv_settings(args) -> KVSettings:
    kv = KVSettings(bits=args.kv_bits, group_size=args.kv_group_size, quant_start=args.kv_quant_start,
                    shard=args.kv_shard, rotate=KV_ROTATE_MODES[args.kv_rotate], fp_window=args.kv_fp_window)
    kv.check()
    return kv


def resolve_checked(settings: RankSettings):
    """Resolve the model once before simulated ranks start (a download happens here, not on
    every rank) and check what needs its config: a head_dim the KV group size does not divide."""
    from ..engine.startup import resolve_model

    model_dir, cfg = resolve_model(settings.model)
    settings.kv.check(cfg.head_dim)
    return model_dir, cfg


def to_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: set[str]) -> list[str]:
    """The options in `args` that differ from their defaults, as command-line words."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def run_simulated(args: argparse.Namespace, command: str, skip: set[str] = frozenset(),
                  env: dict[str, str] | None = None) -> int:
    """Start `command` (this command line, less --simulate/--restart/--exclude and `skip`)
    on N local ranks under the liveness coordinator, relaunching on a lost rank with
    --restart N."""
    from ..launch.simulate import run_local

    rank_args = [command, *to_argv(args._parser, args, skip={"simulate", "restart", "exclude", *skip})]

    def once(hosts: list[str], rank_args: list[str]) -> restart.Attempt:
        return restart.supervise(hosts, lambda coord_env, stop: run_local(len(hosts), rank_args,
                                                                          env={**(env or {}), **coord_env},
                                                                          on_interrupt=stop),
                                 args.peer_timeout, args.step_timeout)

    def say(text: str) -> None:
        print(f"mlx-kvshard: {text}", file=sys.stderr, flush=True)

    return restart.run_with_restarts(once, ["127.0.0.1"] * args.simulate, rank_args, args.restart,
                                     args.exclude, say)
