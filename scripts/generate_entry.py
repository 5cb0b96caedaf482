"""`mlx-kvshard generate` as a rank program for the benchmarks: the same parser and
`run` as the CLI's generate subcommand, without importing the other subcommands."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_kvshard.cli import generate as cmd_generate  # noqa: E402
from mlx_kvshard.errors import UserError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="mlx-kvshard")
    cmd_generate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", *sys.argv[1:]])
    try:
        return int(args.func(args, args._parser) or 0)
    except UserError as e:
        print(f"mlx-kvshard: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
