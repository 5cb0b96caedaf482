"""`mlx-kvshard launch [options] -- <subcommand> [args]`: hostfile → wired ring →
doctor → every rank started and supervised. `--dry-run` shows it, `--check` only checks."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..paths import new_run_dir

from ..launch import restart
from . import options
from ..launch.hostfile import BACKENDS, Cable, ClusterFile, load_hostfile

if TYPE_CHECKING:
    from ..launch.fit import ModelRequest
    from ..launch.spec import LaunchSpec

EPILOG = """examples:
  mlx-kvshard launch --hostfile 2-minis-thunderbolt-ring --dry-run -- generate --model M --prompt hi
  mlx-kvshard launch --hostfile hosts.json --check --model M
  mlx-kvshard launch --simulate 3 -- generate --model tiny --prompt hi
"""


def register(sub) -> None:
    p = sub.add_parser("launch", help="start a subcommand on every host of a hostfile (or N local ranks)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="MLX hostfile JSON, or the name of an example shipped in "
                       "mlx_kvshard/configs/hostfiles (e.g. 2-minis-thunderbolt-ring)")
    where.add_argument("--simulate", type=int, metavar="N", help="N ranks on this machine (ring on 127.0.0.1)")
    p.add_argument("--backend", choices=BACKENDS, help="override the hostfile's backend")
    p.add_argument("--topology", help="cables: JSON [[\"a\",\"b\"],...] or `mlx.distributed_config --dot` output")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="run the preflight doctor only")
    mode.add_argument("--dry-run", action="store_true", help="print the MLX hostfile and each rank's exact command")
    p.add_argument("--skip-check", action="store_true", help="launch without running the doctor first")
    p.add_argument("--json", action="store_true", help="with --dry-run or --check: print JSON")
    p.add_argument("--model", help="model for --check when no subcommand is given (default: the subcommand's --model)")
    p.add_argument("--context", type=int, help="tokens of KV cache to budget per rank (default: --max-context or 8192)")
    p.add_argument("--ssh-command", default=os.environ.get("MLX_KVSHARD_SSH"),
                   help="ssh and its options, e.g. 'ssh -i ~/.ssh/cluster' (default: ssh in BatchMode; "
                        "env MLX_KVSHARD_SSH)")
    p.add_argument("--python", help="python on every host (default: the host's \"python\", else python3)")
    p.add_argument("--cwd", help="working directory on every host (default: the host's \"cwd\")")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for every rank")
    p.add_argument("--starting-port", type=int, help="first ring/coordinator port (default 32323; free ports on loopback)")
    p.add_argument("--connections-per-ip", type=int, default=1, help="ring sockets per IP (as mlx.launch)")
    p.add_argument("--run-dir", help="where per-rank logs go (default <cache>/runs/<time>-<pid>-*, cache: "
                        "MLX_KVSHARD_CACHE or ~/.cache/mlx-kvshard)")
    p.add_argument("--quiet-ranks", action="store_true",
                   help="rank 0's stdout unprefixed, other ranks' stdout to their logs only")
    p.add_argument("--finish-timeout", type=float, default=30.0,
                   help="seconds the others may run on after one rank finished before they count as hung")
    options.add_restart_arguments(p)
    p.add_argument("rank_command", nargs=argparse.REMAINDER,
                   help="-- then the mlx-kvshard subcommand every rank runs, e.g. generate --prompt hi")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..launch.spec import format_dry_run

    rank_args = args.rank_command[1:] if args.rank_command[:1] == ["--"] else list(args.rank_command)
    _check_usage(args, parser, rank_args)
    setup = _setup(args, parser, rank_args)
    if args.dry_run:
        print(json.dumps(setup.spec.to_dict(), indent=2) if args.json else format_dry_run(setup.spec))
        return 0
    if args.check or not args.skip_check:
        code = _preflight(args, setup)
        if args.check or code:
            return code
    return _launch(args, setup)


@dataclass
class _Setup:
    """Everything decided before a rank starts."""

    cluster: ClusterFile
    cables: list[Cable] | None  # --topology
    rank_args: list[str]
    rank_ns: argparse.Namespace | None  # the rank command, parsed
    request: ModelRequest
    envs: list[str]
    spec: LaunchSpec


def _setup(args: argparse.Namespace, parser: argparse.ArgumentParser, rank_args: list[str]) -> _Setup:
    """Hostfile → wired ring → the rank command checked → memory → the exact per-rank commands."""
    from ..launch.fit import check_enough_hosts, context_for
    from ..launch.simulate import localhost_cluster, simulation_env
    from ..launch.topology import load_topology, wire

    if args.simulate is not None:
        cluster = localhost_cluster(args.simulate)
    else:
        cluster = load_hostfile(args.hostfile, backend=args.backend)
    cables = load_topology(args.topology, cluster) if args.topology else None
    wiring = wire(cluster, cables)
    rank_ns = _parse_rank_command(parser, rank_args)
    options.check_restart_arguments(args, rank_ns)
    request = request_from(rank_ns, args.model)
    cfg = _local_config(request.model)
    if cfg is not None:  # declared memory_gb already tells whether the model can fit
        check_enough_hosts([h.label for h in wiring.hosts], [h.memory_gb for h in wiring.hosts], cfg, request,
                           context_for(cfg, request, args.context))
    envs = list(cluster.envs) + list(args.env)
    if args.simulate is not None:
        envs = simulation_env(args.simulate, dict(e.split("=", 1) for e in envs))
    spec = _spec(args, wiring, cluster.backend, rank_args, envs)
    return _Setup(cluster, cables, rank_args, rank_ns, request, envs, spec)


def _spec(args: argparse.Namespace, wiring, backend: str, rank_args: list[str], envs: list[str]):
    from ..launch.spec import build_spec, ssh_command

    return build_spec(wiring, backend, rank_args, envs=envs, ssh_command=ssh_command(args.ssh_command),
                      python=args.python, cwd=args.cwd, starting_port=args.starting_port,
                      connections_per_ip=args.connections_per_ip)


def _preflight(args: argparse.Namespace, setup: _Setup) -> int:
    """The doctor: its report (all of it under --check, else only what is wrong); 1 if a FAIL."""
    from ..launch.doctor import run_doctor

    report = run_doctor(setup.spec, setup.request, args.context)
    if args.check:
        print(json.dumps({"ok": report.ok, "checks": [asdict(c) for c in report.checks]}, indent=2)
              if args.json else report.format())
        return 0 if report.ok else 1
    if not report.ok or any(c.status == "WARN" for c in report.checks):
        print(report.format(), file=sys.stderr)
    else:
        print(f"mlx-kvshard launch: doctor: {len(report.checks)} checks passed (--check lists them)",
              file=sys.stderr)
    if not report.ok:
        print("mlx-kvshard launch: not starting: the doctor found problems (--skip-check starts anyway)",
              file=sys.stderr)
        return 1
    return 0


def _launch(args: argparse.Namespace, setup: _Setup) -> int:
    """Run the ranks; `generate` ranks (which keep a liveness side channel) may be
    relaunched from their checkpoint (--restart)."""
    from ..launch import runner
    from ..launch.topology import wire

    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir()
    timeouts = options.liveness_timeouts(setup.rank_ns)
    if timeouts is None:
        return runner.run(setup.spec, run_dir, quiet_ranks=args.quiet_ranks, finish_timeout=args.finish_timeout)

    front = _front(args, setup)

    def start(sub, sub_cables, attempt_args: list[str], env: dict[str, str], attempt: int, request_stop) -> int:
        """One (re)launch: the hosts left, --resume, the coordinator's address and token (restart.py),
        and where this attempt's rank 0 reaches the front."""
        wiring = wire(sub, sub_cables)
        if front is not None:
            env = {**env, **front.env(restart.address_towards(wiring.hosts[0]))}
        envs = [*setup.envs, *(f"{k}={v}" for k, v in env.items())]
        sub_spec = _spec(args, wiring, setup.cluster.backend, attempt_args, envs)
        try:
            return runner.run(sub_spec, run_dir / f"restart{attempt}" if attempt else run_dir,
                              quiet_ranks=args.quiet_ranks, finish_timeout=args.finish_timeout,
                              on_interrupt=request_stop)
        finally:
            if front is not None:
                front.group_ended()

    code = 1
    try:
        code = restart.run_launch(setup.cluster, setup.cables, setup.rank_args, timeouts, args.restart,
                                  args.exclude, start,
                                  lambda text: print(f"mlx-kvshard launch: {text}", file=sys.stderr, flush=True))
    finally:
        if front is not None:
            from ..front.server import ending

            front.close(*ending(code))
    return code


def _front(args: argparse.Namespace, setup: _Setup):
    """`--restart` with `serve`: the HTTP front that keeps the requests across relaunches
    runs here (mlx_kvshard/front). Rank 0 reaches it over a Unix socket when every rank
    runs on this machine, else over TCP (after --exclude rank 0 may be any host)."""
    ns = setup.rank_ns
    if not args.restart or getattr(ns, "command", None) != "serve":
        return None
    from ..front.server import FrontServer
    from .serve import ENV_API_KEY, server_settings

    ns.served_model_name = ns.served_model_name or ns.model
    if ns.api_key is None:  # `launch --env MLX_KVSHARD_API_KEY=KEY`: the front answers HTTP, so it checks the key
        ns.api_key = dict(e.split("=", 1) for e in setup.envs).get(ENV_API_KEY)
    return FrontServer(server_settings(ns), ns.migration_limit, ns.migration_timeout,
                       tcp=not all(h.is_local for h in setup.cluster.hosts))


def _check_usage(args: argparse.Namespace, parser: argparse.ArgumentParser, rank_args: list[str]) -> None:
    if args.hostfile is None and args.simulate is None:
        parser.error("launch: give --hostfile FILE (your Macs) or --simulate N (ranks on this machine)")
    if not rank_args and not args.check:
        parser.error("launch: give the subcommand every rank runs after --, e.g. -- generate --model tiny --prompt hi")
    if rank_args and (rank_args[0].startswith("-") or rank_args[0] == "launch"):
        parser.error(f"launch: after -- comes an mlx-kvshard subcommand (e.g. generate), got {rank_args[0]!r}")
    if args.connections_per_ip < 1:
        parser.error(f"launch: --connections-per-ip {args.connections_per_ip}: must be at least 1")
    for e in args.env:
        if "=" not in e:
            parser.error(f"launch: --env {e!r}: expected KEY=VALUE")


def _parse_rank_command(parser: argparse.ArgumentParser, rank_args: list[str]) -> argparse.Namespace | None:
    """Parse the rank command with the runtime's own parser (`mlx-kvshard`'s, handed to
    every subcommand), here, once: a typo fails now instead of on every Mac, and its
    defaults (e.g. the model) are known."""
    if not rank_args:
        return None
    try:
        return parser.parse_args(rank_args)
    except SystemExit as e:  # argparse has printed why
        raise UserError(f"the command after -- does not parse ({shlex.join(rank_args)}); nothing was started") from e


def request_from(ns: argparse.Namespace | None, model: str | None = None):
    """What the rank command's parsed options (defaults included) ask for, memory-wise;
    `model` overrides (launch --check --model M without a rank command)."""
    from ..launch.fit import ModelRequest
    from ..settings import parse_shares

    get = (lambda k: getattr(ns, k, None)) if ns is not None else (lambda k: None)
    dtype = None if get("dtype") in (None, "auto") else get("dtype")
    return ModelRequest(model or get("model"), parse_shares(get("weights")), dtype, get("max_context"),
                        bool(get("vocab_parallel")), get("pp") or 1)


def _local_config(model: str | None):
    """The model's config when it is readable here without a download, else None (the
    doctor reads it from the hosts)."""
    if not model:
        return None
    from ..config import ModelConfig

    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelConfig.from_file(path)
    if model == "tiny" or (path.is_file() and path.suffix == ".gguf"):
        from ..models.resolve import resolve_model_dir

        return ModelConfig.from_file(resolve_model_dir(model))
    return None


