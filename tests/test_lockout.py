"""Stalls and crashes never lock a model out, and a stuck batch is noticed: against real server
processes, with real signals. A worker killed (SIGKILL) or stopped (SIGSTOP) under load leaves
the model answering lone requests once it is back; a request whose batch is stuck still gets
its 504 at its deadline; /readyz and /v1/models say while no worker can run the model; and a
batch that runs past workers.batch_timeout_s has its worker killed and replaced, is retried
once, and fails with 500 if it hangs again.

Load is bounded (4 clients, seconds) and goes to 127.0.0.1 only; figures are printed (pytest -s).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np

from tests import fault_models
from tests.conftest import request
from tests.probes import Answer, metric, send, tally, wait_for, work, worker_pids
from tests.server_process import ServerProcess, start_server

RESTARTS = "microbatch_worker_restarts_total"
TIMEOUTS = "microbatch_batch_timeouts_total"


async def until(condition: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
    await asyncio.to_thread(wait_for, condition, timeout_s, what)


def mlp_row() -> np.ndarray:
    return np.ones(256, np.float32)


async def closed_loop(
    session: aiohttp.ClientSession, url: str, timeout_ms: float, stop: asyncio.Event
) -> list[tuple[float, Answer]]:
    """One client sending a request as soon as the last is answered: (answered at, answer)."""
    answers = []
    while not stop.is_set():
        answer = await send(session, url, "mlp", mlp_row(), timeout_ms=timeout_ms)
        answers.append((time.monotonic(), answer))
    return answers


def first_ok_after(answers: list[tuple[float, Answer]], at: float) -> str:
    """Seconds from `at` to the first 200 under load, as text ("never" if none came)."""
    times = [t - at for t, a in answers if t > at and a.status == 200]
    return f"{min(times):.2f} s" if times else "never"


async def lone_requests_until_answered(
    url: str, timeout_ms: float, attempts: int = 20
) -> list[Answer]:
    """Lone requests, one after another, until one is answered 200 (or `attempts` are spent)."""
    answers: list[Answer] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(attempts):
            answers.append(await send(session, url, "mlp", mlp_row(), timeout_ms=timeout_ms))
            if answers[-1].status == 200:
                break
    return answers


def replaced(server: ServerProcess, first: int) -> bool:
    """A new worker has started and loaded its models (the live-workers gauge counts those)."""
    pids = worker_pids(server)
    return bool(pids) and first not in pids and metric(server, "microbatch_workers") == 1


def readyz(server: ServerProcess) -> tuple[int, dict[str, object]]:
    status, _, body = request(server.url, "GET", "/readyz", timeout_s=5)
    return status, json.loads(body)


def listed_mlp(server: ServerProcess) -> dict[str, object]:
    models = json.loads(request(server.url, "GET", "/v1/models")[2])["models"]
    return next(m for m in models if m["name"] == "mlp")


async def test_a_killed_worker_under_tight_deadlines_does_not_lock_the_model_out() -> None:
    with start_server("--model", "mlp", "--cpu-workers", "1") as server:
        (first,) = worker_pids(server)
        restarts = metric(server, RESTARTS)
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            clients = [
                asyncio.create_task(closed_loop(session, server.url, 150.0, stop)) for _ in range(4)
            ]
            await asyncio.sleep(2.0)  # the load itself, not a wait for a condition
            os.kill(first, signal.SIGKILL)
            await until(lambda: metric(server, RESTARTS) == restarts + 1, "the restart")
            await until(lambda: replaced(server, first), "the replacement ready")
            replaced_at = time.monotonic()
            await asyncio.sleep(1.0)  # the load goes on over the replacement for a while
            stop.set()
            timed = [a for answers in await asyncio.gather(*clients) for a in answers]
        lone = await lone_requests_until_answered(server.url, 150.0)
    print(
        f"\nSIGKILL under load (timeout_ms=150): {len(timed)} requests answered "
        f"{tally([a for _, a in timed])}, the first 200 {first_ok_after(timed, replaced_at)} "
        f"after the replacement was ready; then lone requests {tally(lone)}"
    )
    assert lone[-1].status == 200, tally(lone)
    assert len(lone) <= 3, tally(lone)  # it admits at once, not after a long decay


async def test_a_stalled_batch_does_not_lock_the_model_out() -> None:
    """The batch time measured across a stall (SIGSTOP for 3.5 s) is the accident, not the
    model: once the worker runs again, a lone request with a 500 ms deadline is answered."""
    with start_server("--model", "mlp", "--cpu-workers", "1") as server:
        (pid,) = worker_pids(server)
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            clients = [
                asyncio.create_task(closed_loop(session, server.url, 500.0, stop)) for _ in range(4)
            ]
            await asyncio.sleep(1.0)  # the load itself
            stop.set()
            under_load = [a for answers in await asyncio.gather(*clients) for _, a in answers]
            os.kill(pid, signal.SIGSTOP)
            try:
                stalled = asyncio.create_task(
                    send(session, server.url, "mlp", mlp_row(), timeout_ms=60000)
                )
                await asyncio.sleep(3.5)  # the stall itself (below the 5 s batch timeout floor)
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed_at = time.monotonic()
            answer = await stalled
        lone = await lone_requests_until_answered(server.url, 500.0)
        recovered_s = time.monotonic() - resumed_at
    print(
        f"\nSIGSTOP 3.5 s (timeout_ms=500): {len(under_load)} requests before it answered "
        f"{tally(under_load)}, the stalled one {tally([answer])}; then lone requests "
        f"{tally(lone)}, the first 200 {recovered_s:.2f} s after SIGCONT"
    )
    assert answer.status == 200
    assert lone[-1].status == 200, tally(lone)
    assert len(lone) <= 3, tally(lone)


async def test_a_request_in_a_stuck_batch_gets_504_at_its_deadline_and_readyz_says_why() -> None:
    with start_server("--model", "mlp", "--cpu-workers", "1") as server:
        (pid,) = worker_pids(server)
        async with aiohttp.ClientSession() as session:
            os.kill(pid, signal.SIGSTOP)  # the next batch goes to it and sits there
            try:
                task = asyncio.create_task(
                    send(session, server.url, "mlp", mlp_row(), timeout_ms=500)
                )
                # Answered while the worker is still stopped: by the deadline, not the batch.
                await until(task.done, "the stuck request's answer", timeout_s=30.0)
                stuck = task.result()
                await until(lambda: readyz(server)[0] == 503, "/readyz 503")
                status, body = readyz(server)
                listed = listed_mlp(server)
            finally:
                os.kill(pid, signal.SIGCONT)
            await until(lambda: readyz(server)[0] == 200, "/readyz 200 again")
            available_again = listed_mlp(server)["available"]
            after = await send(session, server.url, "mlp", mlp_row(), timeout_ms=500)
    print(f"\nstuck batch: answered {tally([stuck])} before SIGCONT; /readyz said {body}")
    assert stuck.status == 504 and stuck.code == "deadline_exceeded"
    assert "running" in stuck.body["error"]["message"]
    assert status == 503
    unavailable = body["unavailable"]
    assert isinstance(unavailable, dict) and "mlp" in unavailable
    assert listed["available"] is False and "running one batch" in str(listed["unavailable"])
    assert available_again is True
    assert after.status == 200, after.body


async def test_a_stuck_batch_is_retried_on_a_new_worker_after_the_batch_timeout() -> None:
    env = {"MICROBATCH_WORKERS_BATCH_TIMEOUT_S": "1"}
    with start_server("--model", "mlp", "--cpu-workers", "1", env=env) as server:
        (pid,) = worker_pids(server)
        restarts, timeouts = metric(server, RESTARTS), metric(server, TIMEOUTS)
        async with aiohttp.ClientSession() as session:
            os.kill(pid, signal.SIGSTOP)
            answer = await send(session, server.url, "mlp", mlp_row(), timeout_ms=60000)
        print(f"\nbatch timeout (1 s) on a stopped worker: answered {tally([answer])}")
        assert answer.status == 200
        np.testing.assert_equal(worker_pids(server) == [pid], False)
        assert metric(server, RESTARTS) == restarts + 1
        assert metric(server, f'{TIMEOUTS}{{device="cpu",model="mlp"}}') == timeouts + 1


async def test_a_batch_that_hangs_twice_fails_with_500_and_the_model_serves_on(
    tmp_path: Path,
) -> None:
    path = fault_models.save(fault_models.Work(), tmp_path / "work.pt")
    env = {"MICROBATCH_WORKERS_BATCH_TIMEOUT_S": "1"}
    with start_server(
        "--model", f"work={path}:float32[2]", "--cpu-workers", "1", "--max-batch-size", "8", env=env
    ) as server:
        async with aiohttp.ClientSession() as session:
            hung = await send(session, server.url, "work", work(1.0, 5000), timeout_ms=60000)
            await until(lambda: readyz(server)[0] == 200, "a replacement worker")
            after = await send(session, server.url, "work", work(2.0), timeout_ms=60000)
        timeouts = metric(server, f'{TIMEOUTS}{{device="cpu",model="work"}}')
    print(f"\nhangs twice: answered {tally([hung, after])}, batch timeouts {timeouts:.0f}")
    assert hung.status == 500 and hung.code == "model_error"
    assert "workers.batch_timeout_s" in hung.body["error"]["message"]
    assert after.status == 200, after.body
    assert timeouts == 2
