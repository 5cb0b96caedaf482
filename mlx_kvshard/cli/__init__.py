"""`mlx-kvshard` command line: one module per subcommand, dispatched here."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def version_line() -> str:
    """What people paste into a bug report: our version, MLX's, and the device MLX computes on."""
    from importlib import metadata

    from .. import __version__

    try:
        import mlx.core as mx

        backend = "Metal" if mx.metal.is_available() else "CPU"
        mlx_part = f"mlx {mx.__version__} ({backend}, {mx.default_device()})"
    except Exception as e:  # a broken MLX install is exactly what this line must report
        mlx_part = f"mlx unavailable ({type(e).__name__}: {e})"
    try:
        lm_part = f"mlx-lm {metadata.version('mlx-lm')}"
    except metadata.PackageNotFoundError:
        lm_part = "mlx-lm not installed"
    return f"mlx-kvshard {__version__}; {mlx_part}; {lm_part}"


def build_parser() -> argparse.ArgumentParser:
    from . import convert as cmd_convert, generate as cmd_generate, perplexity as cmd_perplexity, plan as cmd_plan
    from . import serve as cmd_serve
    from . import launch as launch_cli

    parser = argparse.ArgumentParser(
        prog="mlx-kvshard",
        description="Run one Llama-class model across MLX ranks, weights and KV cache sharded by head.",
    )
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print mlx-kvshard's version and the MLX it runs on, then exit")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd_generate.register(sub)
    cmd_serve.register(sub)
    cmd_plan.register(sub)
    cmd_perplexity.register(sub)
    cmd_convert.register(sub)
    launch_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..launch.secrets import take_from_stdin

    take_from_stdin()  # a rank under the launcher: its tokens come on stdin, first (launch/secrets.py)
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
