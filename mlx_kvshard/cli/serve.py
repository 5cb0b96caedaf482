"""`mlx-kvshard serve`: an OpenAI-compatible HTTP server on the serving engine. Rank 0
serves HTTP; every rank runs the engine. `--simulate N` starts N local ranks through the
same launcher path as `generate --simulate`; on Macs: `mlx-kvshard launch --hostfile H -- serve ...`."""

from __future__ import annotations

import argparse
import os

from ..errors import UserError
from . import batch, options

ENV_API_KEY = "MLX_KVSHARD_API_KEY"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description=__doc__)
    options.add_model_arguments(p)
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
    g.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="speculative decoding for a batch of one: propose what followed the latest match of the "
                        "last n <= N tokens in prompt + output (0 = off; larger batches decode plainly)")
    g.add_argument("--num-draft", type=int, default=3, metavar="K", help="tokens proposed per verify step (default 3)")
    g.add_argument("--check-sync", action="store_true",
                   help="debug: every rank reports its batch and KV after each join and removal; rank 0 compares")
    options.add_liveness_arguments(p)
    p.add_argument("--migration-limit", type=int, default=3, metavar="K",
                   help="with --restart: move a request in flight to the relaunched group at most K times "
                        "(default 3); past that it ends with an error")
    p.add_argument("--migration-timeout", type=float, default=120.0, metavar="S",
                   help="with --restart: a request waits at most S seconds for the group to come back "
                        "(default 120)")
    p.set_defaults(func=run, _parser=p)


def server_settings(args):
    from ..settings import ServerSettings

    return ServerSettings(host=args.host, port=args.port, model_id=args.served_model_name or args.model,
                          api_key=args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY) or None,
                          max_body_bytes=args.max_body_bytes, default_max_tokens=args.max_tokens)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = options.rank_settings(args)  # every flag checked before anything starts
    engine, server = batch.engine_settings(args), server_settings(args)
    engine.validate()
    server.validate()
    if args.migration_limit < 0:
        raise UserError(f"--migration-limit {args.migration_limit}: must be 0 (never move a request) or more")
    if not args.migration_timeout > 0:
        raise UserError(f"--migration-timeout {args.migration_timeout}: must be a positive number of seconds")
    if args.simulate is not None:
        return simulate(args)
    from ..server.run import serve

    return serve(settings, engine, server)


def simulate(args: argparse.Namespace) -> int:
    """Resolve the model once (a download happens here, not on every rank), then start the
    ranks under the liveness coordinator, relaunching on a lost rank with --restart N."""
    from ..settings import default_dtype

    model_dir, _ = options.resolve_checked(options.rank_settings(args))
    args.served_model_name = args.served_model_name or args.model
    args.model = str(model_dir)
    args.dtype = default_dtype(args.dtype)
    env = {}
    if args.api_key:  # to rank 0 through the environment, not its command line (ps shows that)
        env[ENV_API_KEY] = args.api_key
    if not args.restart:
        return options.run_simulated(args, "serve", skip={"api_key"}, env=env)
    # --restart: the HTTP front runs here, in the launcher, and outlives every group (mlx_kvshard/front)
    from ..front.server import FrontServer, ending

    front = FrontServer(server_settings(args), args.migration_limit, args.migration_timeout)
    code = 1
    try:
        code = options.run_simulated(args, "serve", skip={"api_key"}, env={**env, **front.env()})
    finally:
        front.close(*ending(code))
    return code
