"""`microbatch bench`: measure the model ceiling, the HTTP ceiling and the server (batching off
and default) for each built-in model; write JSON and Markdown and print the tables.

CLI process; the bench itself lives in bench/suite/runner.py (imported when the command runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.config import DEFAULT_MODELS, ConfigError

DESCRIPTION = (
    "Start a bare echo server (the HTTP ceiling), the server with batching off "
    "and the server with its default config, time the raw model loop (the model ceiling), "
    "and measure saturation throughput, latency at half of saturation and lone-request "
    "latency for each built-in model, in interleaved rounds; report medians and ratios."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short measurements (under 2 minutes)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    p.add_argument(
        "--model",
        action="append",
        choices=DEFAULT_MODELS,
        help="a built-in model to measure (repeatable; default: all)",
    )
    p.add_argument(
        "--driver",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="saturation driver: wrk where it is installed (auto), else the Python generator",
    )
    p.add_argument("--json", default="results/bench.json", help="default results/bench.json")
    p.add_argument("--markdown", default="results/bench.md", help="default results/bench.md")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.loadgen.errors import LoadGenError
    from bench.suite.runner import bench_settings, run_bench
    from bench.suite.summary import bench_markdown
    from bench.suite.wrk import wrk_path

    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    if args.driver == "wrk" and not wrk_path():
        raise ConfigError("--driver wrk: wrk is not on PATH")
    models = tuple(dict.fromkeys(args.model or DEFAULT_MODELS))
    settings = bench_settings(args.quick, args.rounds, models, args.driver)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = run_bench(settings, log)
    except LoadGenError as exc:
        print(f"microbatch bench: {exc}", file=sys.stderr)
        return 1
    text = bench_markdown(result)
    for path, content in ((args.json, json.dumps(result, indent=1) + "\n"), (args.markdown, text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(content)
    print(text)
    print(f"wrote {args.json} and {args.markdown}")
    return 0
