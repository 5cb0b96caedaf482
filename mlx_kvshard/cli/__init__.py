"""`mlx-kvshard` command line: one module per subcommand, dispatched here."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from . import generate as cmd_generate, plan as cmd_plan, serve as cmd_serve
    from . import launch as launch_cli

    parser = argparse.ArgumentParser(
        prog="mlx-kvshard",
        description="Run one Llama-class model across MLX ranks, weights and KV cache sharded by head.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmd_generate.register(sub)
    cmd_serve.register(sub)
    cmd_plan.register(sub)
    launch_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, parser) or 0)
    except UserError as e:
        print(f"mlx-kvshard: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mlx-kvshard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
