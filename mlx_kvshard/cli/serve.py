"""`mlx-kvshard serve`: an OpenAI-compatible HTTP server on the serving engine. Rank 0
serves HTTP; every rank runs the engine. `--simulate N` starts N local ranks through the
same launcher path as `generate --simulate`; on Macs: `mlx-kvshard launch --hostfile H -- serve ...`."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError
from ..launch import restart
from ..liveness import client as liveness
from . import batch

ENV_API_KEY = "MLX_KVSHARD_API_KEY"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description=__doc__)
    p.add_argument("--model", default="tiny", help="local HF-format directory, hub id, or 'tiny' (embedded, default)")
    p.add_argument("--served-model-name", help="the model id clients use (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every endpoint but /health (or env {ENV_API_KEY})")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="tokens generated when a request sets no max_tokens (default 512)")
    g = p.add_argument_group("engine")
    batch.add_engine_arguments(g)  # past --max-waiting queued requests, a request gets 429
    g.add_argument("--max-context", type=int, default=None,
                   help="max prompt + generated tokens per request (default: the model's max_position_embeddings)")
    g.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per engine step (default 512)")
    g.add_argument("--check-sync", action="store_true",
                   help="debug: every rank reports its batch and KV after each join and removal; rank 0 compares")
    s = p.add_argument_group("model and sharding")
    s.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto"], default=None,
                   help="compute dtype (default: float32 on Linux CPU, the checkpoint's on macOS)")
    s.add_argument("--weights", help="per-rank weights for the shard split, e.g. memory in GB: 64,24,16")
    s.add_argument("--vocab-parallel", action="store_true", help="split lm_head by vocabulary rows across ranks")
    s.add_argument("--backend", default="any", help="MLX distributed backend (ring, jaccl, any)")
    s.add_argument("--link", metavar="PROFILE", help="simulation: make each collective cost a link profile's time")
    p.add_argument("--simulate", type=int, metavar="N", help="start N local ranks (ring on 127.0.0.1)")
    liveness.add_arguments(p)
    restart.add_arguments(p)
    p.set_defaults(func=run, _parser=p)


def server_settings(args):
    from ..settings import ServerSettings

    return ServerSettings(host=args.host, port=args.port, model_id=args.served_model_name or args.model,
                          api_key=args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY) or None,
                          max_body_bytes=args.max_body_bytes, default_max_tokens=args.max_tokens)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    liveness.check_arguments(args)
    restart.check_arguments(args)
    if args.restart and args.simulate is None:
        raise UserError("--restart relaunches ranks: use it with --simulate N (or on `mlx-kvshard launch`)")
    if args.prefill_step < 1:
        raise UserError(f"--prefill-step {args.prefill_step}: must be at least 1")
    if args.max_context is not None and args.max_context < 2:
        raise UserError(f"--max-context {args.max_context}: must be at least 2")
    batch.engine_settings(args).validate()
    server_settings(args).validate()
    if args.simulate is not None:
        return simulate(args)
    from ..server.run import serve

    return serve(batch.rank_settings(args), batch.engine_settings(args), server_settings(args))


def simulate(args: argparse.Namespace) -> int:
    """Resolve the model once (a download happens here, not on every rank), then start the
    ranks under the liveness coordinator, relaunching on a lost rank with --restart N."""
    from ..launch.simulate import run_local
    from ..models.resolve import resolve_model_dir
    from .generate import default_dtype, to_argv

    if args.simulate < 1:
        raise UserError(f"--simulate {args.simulate}: need at least 1 rank")
    args.served_model_name = args.served_model_name or args.model
    args.model = str(resolve_model_dir(args.model))
    args.dtype = default_dtype(args.dtype)
    env = {}
    if args.api_key:  # to rank 0 through the environment, not its command line (ps shows that)
        env[ENV_API_KEY] = args.api_key
    rank_args = ["serve", *to_argv(args._parser, args, skip={"simulate", "restart", "exclude", "api_key"})]

    def once(hosts: list[str], rank_args: list[str]) -> restart.Attempt:
        return restart.supervise(hosts, lambda coord_env: run_local(len(hosts), rank_args, env={**env, **coord_env}),
                                 args.peer_timeout, args.step_timeout)

    def say(text: str) -> None:
        print(f"mlx-kvshard: {text}", file=sys.stderr, flush=True)

    return restart.run_with_restarts(once, ["127.0.0.1"] * args.simulate, rank_args, args.restart,
                                     args.exclude, say)
