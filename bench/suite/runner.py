"""`microbatch bench`: the model ceiling (raw model loop), the HTTP ceiling (bare echo server;
also through aiohttp's Application, for reference), the server unbatched and the server as
configured by default, for each built-in model:
saturation throughput, latency at half of saturation, lone-request latency, in interleaved
rounds (the machine is noisy: medians, not single runs).

CLI process: starts the servers as subprocesses, drives them; summary.py does the sums.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.loadgen.errors import LoadGenError
from bench.loadgen.loadtest import run_loadtest
from bench.loadgen.payload import build_body
from bench.loadgen.plan import CLOSED, OPEN, LoadPlan
from bench.loadgen.progress import ProgressBar
from bench.loadgen.schedule import closed_loop_phases, open_loop_phases
from bench.suite.machine import machine_meta
from bench.suite.model_loop import measure_models
from bench.suite.servers import (
    MICROBATCH_READY,
    ServerProcess,
    clean_env,
    echo_argv,
    microbatch_argv,
    spawn,
    wait_listening,
)
from bench.suite.summary import (
    APP_ECHO,
    CONFIGS,
    DEFAULT,
    ECHO,
    UNBATCHED,
    Measurement,
    as_dicts,
    medians,
    ratios,
)
from bench.suite.wrk import run_wrk_blocking, wrk_path
from server.config import WorkersConfig
from server.models.builtin import LAYERS, builtin_input_spec

Log = Callable[[str], None]
ONE_PROCESS_RPS = 2000.0
SERVER_ARGS: dict[str, tuple[list[str], str | None]] = {
    ECHO: (echo_argv(), None),
    APP_ECHO: (echo_argv("--app"), None),
    UNBATCHED: (microbatch_argv("--max-batch-size", "1"), MICROBATCH_READY),
    DEFAULT: (microbatch_argv(), MICROBATCH_READY),
}


@dataclass(frozen=True)
class BenchSettings:
    quick: bool
    rounds: int
    models: tuple[str, ...]
    driver: str  # "wrk" or "python"
    connections: int = 64
    saturation_s: float = 5.0
    half_load_s: float = 5.0
    warmup_s: float = 1.0
    lone_s: float = 2.0
    model_loop_s: float = 1.0
    generator_s: float = 5.0
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def bench_settings(
    quick: bool, rounds: int | None, models: tuple[str, ...], driver: str
) -> BenchSettings:
    """--quick keeps each measurement short so that the whole run takes under two minutes."""
    chosen = driver if driver != "auto" else ("wrk" if wrk_path() else "python")
    if quick:
        return BenchSettings(
            True, rounds or 3, models, chosen, saturation_s=1.0, half_load_s=0.8,
            warmup_s=0.2, lone_s=0.4, model_loop_s=0.1, generator_s=1.0,
        )  # fmt: skip
    return BenchSettings(False, rounds or 3, models, chosen)


def run_bench(settings: BenchSettings, log: Log) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    workers = WorkersConfig()
    threads = workers.resolved_threads(cores)
    meta = machine_meta(settings.driver)
    meta |= {"torch_threads": threads, "server_cpu_workers": workers.resolved_cpu_workers(cores)}
    log(f"model loop: {', '.join(settings.models)} at batch sizes {settings.batch_sizes}")
    loop = measure_models(settings.models, settings.batch_sizes, settings.model_loop_s, threads)
    model_loop = {name: [asdict(p) for p in points] for name, points in loop.items()}
    servers = _start_servers(log)
    try:
        generator = measure_generator(servers[ECHO], settings, log)
        measurements = _rounds(servers, settings, log)
    finally:
        for server in servers.values():
            server.stop()
    summary = medians(measurements)
    return {
        "meta": meta,
        "settings": asdict(settings),
        "model_loop": model_loop,
        "generator": generator,
        "rounds": as_dicts(measurements),
        "summary": summary,
        "ratios": ratios(summary, model_loop),
    }


def _start_servers(log: Log) -> dict[str, ServerProcess]:
    env = clean_env(os.environ)
    servers = {name: spawn(name, argv, env) for name, (argv, _) in SERVER_ARGS.items()}
    try:
        for name, (_, ready) in SERVER_ARGS.items():
            log(f"{name} server at {wait_listening(servers[name], ready, 180.0)}")
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def _rounds(
    servers: dict[str, ServerProcess], settings: BenchSettings, log: Log
) -> list[Measurement]:
    measurements = []
    bodies = {m: build_body(builtin_input_spec(m), 1, None, None, 0) for m in settings.models}
    for r in range(settings.rounds):
        for model in settings.models:
            for config in CONFIGS:
                server = servers[config]
                if not server.alive():
                    raise LoadGenError(f"the {config} server died:\n{server.log()[-2000:]}")
                m = measure_cell(r, model, config, server.url, bodies[model], settings)
                log(
                    f"round {r + 1}/{settings.rounds} {model:6} {config:9}: saturation "
                    f"{m.saturation_rps:8,.0f} req/s; at {m.half_rate_rps:,.0f} req/s p50 "
                    f"{_ms(m.half_p50_ms)} p99 {_ms(m.half_p99_ms)}{' (behind)' * m.half_behind}; "
                    f"lone p50 {_ms(m.lone_p50_ms)}"
                )
                measurements.append(m)
    return measurements


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def measure_cell(
    round_: int, model: str, config: str, url: str, body: bytes, settings: BenchSettings
) -> Measurement:
    lone = _loadtest(
        LoadPlan(url, model, CLOSED, closed_loop_phases(settings.lone_s, 0.2), concurrency=1)
    )
    saturation_rps, saturation_errors = saturate(url, model, body, settings)
    half_rate = max(1.0, saturation_rps / 2)
    phases = open_loop_phases(half_rate, settings.half_load_s, settings.warmup_s, None)
    processes = half_load_processes(half_rate, os.cpu_count() or 1)
    plan = LoadPlan(
        url, model, OPEN, phases, seed=round_, processes=processes, connections=settings.connections
    )
    half = _loadtest(plan)
    s = half["summary"]
    return Measurement(
        round=round_,
        model=model,
        config=config,
        saturation_rps=saturation_rps,
        saturation_errors=saturation_errors,
        half_rate_rps=half_rate,
        half_processes=processes,
        half_p50_ms=s["latency_ms"]["p50"],
        half_p99_ms=s["latency_ms"]["p99"],
        half_ok_rps=s["ok_rps"],
        half_errors=s["sent"] - s["ok"],
        half_behind=s["schedule_lag"]["fell_behind"] or s["generator"]["saturated"],
        half_mean_batch=s["mean_batch_size"],
        lone_p50_ms=lone["summary"]["latency_ms"]["p50"],
    )


def half_load_processes(rate_rps: float, cores: int) -> int:
    """A second generator process above ONE_PROCESS_RPS where there are cores to spare for it;
    on two cores it only takes CPU from the server it measures."""
    return 2 if rate_rps > ONE_PROCESS_RPS and cores >= 4 else 1


def saturate(url: str, model: str, body: bytes, settings: BenchSettings) -> tuple[float, int]:
    """Successful answers per second with `connections` keep-alive connections, and errors."""
    if settings.driver == "wrk":
        wrk = wrk_path()
        assert wrk is not None
        report = run_wrk_blocking(
            wrk, f"{url}/v1/models/{model}/infer", body, settings.connections, settings.saturation_s
        )
        errors = report.non_2xx + report.socket_errors
        return max(0, report.requests - errors) / report.duration_s, errors
    # Without wrk: the Python generator, in several processes so that it is less of a limit.
    phases = closed_loop_phases(settings.saturation_s, settings.warmup_s)
    processes = max(2, min(4, os.cpu_count() or 1))
    plan = LoadPlan(
        url, model, CLOSED, phases, concurrency=settings.connections, processes=processes
    )
    s = _loadtest(plan)["summary"]
    return s["ok_rps"], s["sent"] - s["ok"]


def _loadtest(plan: LoadPlan) -> dict[str, Any]:
    report, _ = run_loadtest(plan, ProgressBar(sys.stderr, False, plan.total_s))
    return report


def measure_generator(echo: ServerProcess, settings: BenchSettings, log: Log) -> dict[str, Any]:
    """Requests per second of one generator process on one core against the echo server."""
    can_pin = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    if can_pin:
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {0})
        echo.pin({1})
    try:
        model = settings.models[0] if settings.models else next(iter(LAYERS))
        plan = LoadPlan(
            echo.url, model, CLOSED, closed_loop_phases(settings.generator_s, 0.0), concurrency=64
        )
        cpu_before, wall_before = time.process_time(), time.monotonic()
        summary = _loadtest(plan)["summary"]
        cpu_s, wall_s = time.process_time() - cpu_before, time.monotonic() - wall_before
    finally:
        if can_pin:
            os.sched_setaffinity(0, mine)
            echo.pin(mine)
    result = {
        "model": model,
        "concurrency": 64,
        "pinned": can_pin,
        "rps": summary["throughput_rps"],
        "cpu_fraction": cpu_s / wall_s,
        "rps_per_cpu_s": summary["answered"] / cpu_s if cpu_s > 0 else None,
    }
    log(
        f"generator, one core: {result['rps']:,.0f} req/s at {result['cpu_fraction']:.0%} CPU "
        f"({result['rps_per_cpu_s'] or 0:,.0f} requests per CPU-second)"
    )
    return result
