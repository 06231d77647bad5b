"""Runs a load plan in this process or in several generator processes, and gathers the records.

CLI process (main thread) plus, with --processes N > 1, N spawned worker processes. Only plain
data crosses: the plan, the request bodies, a slice of the schedule in; records or an error text
out. All processes share one start time on the system-wide monotonic clock (CLOCK_MONOTONIC),
set once every worker has reported ready, so that their schedules interleave as planned.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from bench.loadgen.driver import PartResult, run_part
from bench.loadgen.errors import LoadGenError
from bench.loadgen.payload import Bodies
from bench.loadgen.plan import LoadPlan
from bench.loadgen.record import RequestRecord
from bench.loadgen.schedule import Schedule, split_schedule

if TYPE_CHECKING:  # the spawned generator processes draw no bar: they need not import rich
    from bench.loadgen.progress import ProgressBar

T = TypeVar("T")
START_LEAD_S = 0.1  # between "go" and the first send, so that every process is waiting
READY_TIMEOUT_S = 60.0  # for spawned workers to import and report ready
PROGRESS_EVERY_S = 0.25


def run_on_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop where it is installed (the generator's own speed depends on it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


class LocalTally:
    def __init__(self) -> None:
        self.done = 0
        self.failed = 0

    def add(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok


@dataclass
class SharedTally:
    """One worker's two slots (done, failed) in an unlocked shared array: one writer each."""

    counters: Any  # multiprocessing.Array("q", 2 * processes, lock=False)
    slot: int

    def add(self, ok: bool) -> None:
        self.counters[2 * self.slot] += 1
        if not ok:
            self.counters[2 * self.slot + 1] += 1


def split_clients(clients: int, parts: int) -> list[int]:
    return [clients // parts + (1 if k < clients % parts else 0) for k in range(parts)]


class RunResult(NamedTuple):
    records: list[RequestRecord]
    cpu_fractions: list[float]  # each generator process's busy share of one core


def run_load_blocking(
    plan: LoadPlan, bodies: Bodies, schedule: Schedule | None, bar: ProgressBar
) -> RunResult:
    try:
        if plan.processes <= 1:
            part = _run_here(plan, bodies, schedule, bar)
            return RunResult(part.records, [part.cpu_fraction])
        parts = _run_in_processes(plan, bodies, schedule, bar)
        records = [record for part in parts for record in part.records]
        return RunResult(records, [part.cpu_fraction for part in parts])
    finally:
        bar.close()


def _run_here(
    plan: LoadPlan, bodies: Bodies, schedule: Schedule | None, bar: ProgressBar
) -> PartResult:
    tally = LocalTally()

    async def main() -> PartResult:
        start_at = time.monotonic() + START_LEAD_S

        async def show() -> None:
            while True:
                bar.update(time.monotonic() - start_at, tally.done, tally.failed)
                await asyncio.sleep(PROGRESS_EVERY_S)

        progress = asyncio.create_task(show())
        try:
            return await run_part(plan, bodies, schedule, plan.concurrency, start_at, tally)
        finally:
            progress.cancel()

    return run_on_loop(main)


def _run_in_processes(
    plan: LoadPlan, bodies: Bodies, schedule: Schedule | None, bar: ProgressBar
) -> list[PartResult]:
    n = plan.processes
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    counters = ctx.Array("q", 2 * n, lock=False)
    results = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0, lock=False)
    parts = split_schedule(schedule, n) if schedule is not None else [None] * n
    clients = split_clients(plan.concurrency, n)
    workers = [
        ctx.Process(
            target=_worker_blocking,
            args=(k, plan, bodies, parts[k], clients[k], counters, results, go, start_at),
            daemon=True,
        )
        for k in range(n)
    ]
    for worker in workers:
        worker.start()
    try:
        _collect(results, workers, "ready", time.monotonic() + READY_TIMEOUT_S, None)
        start_at.value = time.monotonic() + START_LEAD_S
        go.set()
        deadline = start_at.value + plan.total_s + plan.client_timeout_s + 30.0

        def show() -> None:
            done = sum(counters[0::2])
            bar.update(time.monotonic() - start_at.value, done, sum(counters[1::2]))

        found = _collect(results, workers, "done", deadline, show)
    finally:
        for worker in workers:
            worker.join(timeout=5.0)
            if worker.is_alive():
                worker.kill()
    return found


def _collect(
    results: Any,
    workers: list[Any],
    kind: str,
    deadline: float,
    tick: Callable[[], None] | None,
) -> list[Any]:
    """One `kind` message from each worker, in worker order; LoadGenError on error or death."""
    found: dict[int, Any] = {}
    quiet = 0
    while len(found) < len(workers):
        if time.monotonic() > deadline:
            raise LoadGenError(f"generator processes did not report {kind!r} in time")
        try:
            what, k, payload = results.get(timeout=PROGRESS_EVERY_S)
        except queue.Empty:
            quiet += 1
            _check_alive(workers, found, quiet)
            if tick:
                tick()
            continue
        quiet = 0
        if what == "error":
            raise LoadGenError(f"generator process {k} failed: {payload}")
        found[k] = payload
    return [found[k] for k in range(len(workers))]


def _check_alive(workers: list[Any], found: dict[int, Any], quiet: int) -> None:
    # After two quiet waits in a row, anything a dead worker sent has been read already.
    dead = [k for k, w in enumerate(workers) if k not in found and not w.is_alive()]
    if dead and quiet >= 2:
        raise LoadGenError(f"generator process {dead[0]} exited without its result")


def _worker_blocking(
    k: int,
    plan: LoadPlan,
    bodies: Bodies,
    schedule: Schedule | None,
    clients: int,
    counters: Any,
    results: Any,
    go: Any,
    start_at: Any,
) -> None:
    """A generator process: report ready, wait for the shared start, run, send the records."""
    try:
        results.put(("ready", k, None))
        if not go.wait(READY_TIMEOUT_S):
            return
        tally = SharedTally(counters, k)
        part = run_on_loop(
            lambda: run_part(plan, bodies, schedule, clients, float(start_at.value), tally)
        )
        results.put(("done", k, part))
    except Exception as exc:  # the worker's boundary: the error travels as text
        results.put(("error", k, f"{type(exc).__name__}: {exc}"))
