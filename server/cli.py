"""The `microbatch` command: a table of subcommands, each in its own module, loaded when chosen.

Main process; no logic beyond parsing and dispatching to the chosen command's `run`. Only the
chosen command's module is imported (the table alone gives `microbatch --help` its list), so
that `microbatch serve` never loads the tooling in bench/ or the libraries it needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from server.config import ConfigError

# name -> (module, one-line help). Each module has DESCRIPTION and add_arguments(parser), which
# adds the command's flags and sets `run`.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.commands.serve", "run the batching inference server"),
    "infer": ("server.commands.infer", "run a model once in this process on a .npy file"),
    "models": ("server.commands.remote", "list the models a running server serves"),
    "loadtest": (
        "bench.commands.loadtest",
        "drive load at a server and report throughput and latency",
    ),
    "compare": (
        "bench.commands.compare",
        "time a model on the CPU and each GPU over batch sizes; find the crossover",
    ),
    "bench": ("bench.commands.bench", "benchmark the server against the model and HTTP ceilings"),
}
# What to install when a command's module cannot import one of these (the top-level name).
MISSING = {
    "bench": "the tooling (the bench package), which this installation leaves out; install "
    "microbatch from its source tree",
    "rich": "the bench extra: pip install 'microbatch[bench]'",
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command named in argv: its first word that is not an option (`microbatch` itself
    takes none but --help), if the table has it."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Every command with its help line; the flags of the chosen one only (its module loaded)."""
    parser = argparse.ArgumentParser(
        prog="microbatch",
        description="A dynamic-batching inference server for PyTorch models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_line) in COMMANDS.items():
        command = sub.add_parser(name, help=help_line)
        if name == chosen:
            module = importlib.import_module(module_name)
            command.description = module.DESCRIPTION
            module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(chosen_command(args_in)).parse_args(args_in)
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"microbatch: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        missing = MISSING.get((exc.name or "").partition(".")[0])
        if missing is None:
            raise
        print(f"microbatch {chosen_command(args_in)}: needs {missing}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
