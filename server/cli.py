"""The `microbatch` command: one subcommand per module in server/commands, wired here.

Main process; no logic beyond parsing and dispatching to the chosen command's `run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench.commands import bench, compare, loadtest
from server.commands import infer, remote, serve
from server.config import ConfigError

# Each module offers register(subparsers), which sets `run` on its parser.
COMMANDS = (serve, infer, remote, loadtest, compare, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microbatch",
        description="A dynamic-batching inference server for PyTorch models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"microbatch: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
