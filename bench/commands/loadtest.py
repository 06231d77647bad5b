"""`microbatch loadtest`: parse the flags into a LoadPlan, run it, print and write the report.

CLI process; the generator itself lives in bench/loadgen (imported when the command runs).
"""

from __future__ import annotations

import argparse
import sys

from bench.loadgen.lengths import LengthDist
from bench.loadgen.plan import CLOSED, OPEN, LoadPlan
from bench.loadgen.schedule import closed_loop_phases, open_loop_phases
from server.config import ConfigError

DESCRIPTION = (
    "Send requests to a model on a running server, open loop (--rate or "
    "--schedule: sends on a schedule, latency measured from each scheduled send time) or "
    "closed loop (--concurrency clients), and report throughput, latency percentiles, "
    "errors, batch sizes and devices. Inputs are random, of the model's shape, unless "
    "--input is given."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="http://HOST:PORT or unix:///PATH")
    p.add_argument("--model", required=True, help="model name")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: requests per second")
    load.add_argument(
        "--schedule", metavar="R1:S1,R2:S2,...", help="open loop: R req/s for S s, in turn"
    )
    load.add_argument("--concurrency", type=int, help="closed loop: this many clients")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured (default 10)")
    p.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unreported warm-up (default 2)"
    )
    p.add_argument(
        "--arrivals", choices=["poisson", "constant"], default="poisson", help="open loop"
    )
    p.add_argument("--input", metavar="FILE.npy", help="samples to send (default: random)")
    p.add_argument("--samples-per-request", type=int, default=1, metavar="N")
    p.add_argument(
        "--lengths",
        metavar="DIST",
        help="for a model that takes any length (-1 in its shape): the lengths sent, "
        "fixed:L, uniform:LO:HI or pareto:LO:HI[:ALPHA] (long-tailed)",
    )
    p.add_argument("--timeout-ms", type=float, help="deadline sent with each request")
    p.add_argument(
        "--client-timeout-s", type=float, default=30.0, help="give up on a request after this"
    )
    p.add_argument("--processes", type=int, default=1, help="generator processes (default 1)")
    p.add_argument(
        "--connections", type=int, default=256, help="keep-alive connections per process"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and random inputs")
    p.add_argument("--json", metavar="OUT.json", help="write the full result as JSON")
    p.add_argument("--markdown", metavar="OUT.md", help="write a Markdown summary")
    p.add_argument("--records", metavar="OUT.csv", help="write every request as a CSV row")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run)


def plan_from_args(args: argparse.Namespace) -> LoadPlan:
    for flag, value, least in (
        ("--samples-per-request", args.samples_per_request, 1),
        ("--processes", args.processes, 1),
        ("--connections", args.connections, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if args.client_timeout_s <= 0:
        raise ConfigError(f"--client-timeout-s must be > 0, got {args.client_timeout_s}")
    if args.timeout_ms is not None and args.timeout_ms <= 0:
        raise ConfigError(f"--timeout-ms must be > 0, got {args.timeout_ms}")
    if args.concurrency is not None:
        if args.concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
        mode, phases = CLOSED, closed_loop_phases(args.duration, args.warmup)
    else:
        mode = OPEN
        phases = open_loop_phases(args.rate, args.duration, args.warmup, args.schedule)
    return LoadPlan(
        url=args.url,
        model=args.model,
        mode=mode,
        phases=phases,
        arrivals=args.arrivals,
        concurrency=args.concurrency or 0,
        samples_per_request=args.samples_per_request,
        timeout_ms=args.timeout_ms,
        client_timeout_s=args.client_timeout_s,
        processes=args.processes,
        connections=args.connections,
        input_path=args.input,
        seed=args.seed,
        lengths=_lengths(args.lengths),
    )


def _lengths(text: str | None) -> LengthDist | None:
    from bench.loadgen.errors import LoadGenError
    from bench.loadgen.lengths import parse_lengths

    if text is None:
        return None
    try:
        return parse_lengths(text)
    except LoadGenError as exc:
        raise ConfigError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from bench.loadgen.errors import LoadGenError
    from bench.loadgen.loadtest import behind_warning, brief, run_loadtest, write_outputs
    from bench.loadgen.progress import ProgressBar, enabled_for
    from bench.loadgen.target import parse_target

    plan = plan_from_args(args)
    parse_target(plan.url)  # a bad --url is a flag error, reported before anything starts
    bar = ProgressBar(sys.stderr, enabled_for(sys.stderr, args.no_progress), plan.total_s)
    try:
        report, records = run_loadtest(plan, bar)
        written = write_outputs(report, records, args.json, args.markdown, args.records, args.plot)
    except LoadGenError as exc:
        print(f"microbatch loadtest: {exc}", file=sys.stderr)
        return 1
    print(brief(report))
    for path in written:
        print(f"wrote {path}")
    warning = behind_warning(report)
    if warning:
        print(warning, file=sys.stderr)
    return 0
