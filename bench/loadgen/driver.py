"""Sends the requests of one generator process and records each one: an open loop that fires on
its schedule whatever the server does, or a closed loop of clients that each wait for an answer.

Event loop of a generator process (uvloop). Requests go through the client's transport
(client/transport.py) without its retries: each request is sent once and recorded as it went.
Every loop ends: the open loop after its last send, the clients at the run's end, the
stragglers after a bounded drain (then cancelled and recorded as unfinished).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from bench.loadgen.payload import Bodies
from bench.loadgen.plan import OPEN, LoadPlan
from bench.loadgen.record import (
    CLIENT_TIMEOUT,
    CONNECTION_ERROR,
    NAN,
    UNFINISHED,
    RequestRecord,
    failed,
    from_answer,
)
from bench.loadgen.schedule import Schedule, phase_windows
from bench.loadgen.target import infer_path, parse_target
from client.errors import Timeout, TransportError
from client.transport import Address, Transport
from client.wire import MSGPACK_HEADERS

MIN_SLEEP_S = 0.001


class Tally(Protocol):
    """Counts answers as they come, for the progress bar."""

    def add(self, ok: bool) -> None: ...


class Sender:
    """Sends one request and appends its record; latency counts from the scheduled time."""

    def __init__(
        self,
        transport: Transport,
        address: Address,
        path: str,
        bodies: Bodies,
        timeout_s: float,
        start_at: float,
        tally: Tally,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport, self._address, self._path = transport, address, path
        self._bodies, self._timeout_s = bodies, timeout_s
        self._sent = 0  # the bodies are sent in turn (one, unless lengths vary)
        self._start_at, self._tally, self._clock = start_at, tally, clock
        self.records: list[RequestRecord] = []

    def now_s(self) -> float:
        return self._clock() - self._start_at

    def give_up(self, phase: int, scheduled_s: float, dispatched_s: float, code: str) -> None:
        """Record a request that was never sent (it waited past the client timeout, or the
        run ended first)."""
        self.records.append(failed(phase, scheduled_s, dispatched_s, NAN, NAN, code))
        self._tally.add(False)

    async def send(self, phase: int, scheduled_s: float, dispatched_s: float) -> None:
        sent_s = self.now_s()
        body = self._bodies[self._sent % len(self._bodies)]
        self._sent += 1
        try:
            reply = await self._transport.request(
                self._address,
                "POST",
                self._path,
                body=body,
                headers=MSGPACK_HEADERS,
                timeout_s=self._timeout_s,
            )
            done_s = self.now_s()
            record = from_answer(
                phase, scheduled_s, dispatched_s, sent_s, done_s, reply.status, reply.body
            )
        except Timeout:
            record = failed(phase, scheduled_s, dispatched_s, sent_s, self.now_s(), CLIENT_TIMEOUT)
        except (TransportError, OSError):
            record = failed(
                phase, scheduled_s, dispatched_s, sent_s, self.now_s(), CONNECTION_ERROR
            )
        except asyncio.CancelledError:
            self.records.append(failed(phase, scheduled_s, dispatched_s, sent_s, NAN, UNFINISHED))
            raise
        self.records.append(record)
        self._tally.add(record.ok)


async def run_open(
    sender: Sender, schedule: Schedule, lanes: int, client_timeout_s: float, drain_s: float
) -> None:
    """Release each request when due, whatever the server does; `lanes` loops (one connection
    each, at most) send them. A request due while every lane waits on the server waits for a
    lane, and its latency still counts from its schedule: the server's queueing shows in full.

    Lanes instead of a task per request keep the generator's cost flat under overload (no pile
    of pending tasks and connections for the garbage collector to walk)."""
    offsets, phases = schedule.offsets_s.tolist(), schedule.phase.tolist()
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()

    async def lane() -> None:
        while (item := await due.get()) is not None:
            i, dispatched_s = item
            if sender.now_s() - offsets[i] > client_timeout_s:
                sender.give_up(phases[i], offsets[i], dispatched_s, CLIENT_TIMEOUT)
            else:
                await sender.send(phases[i], offsets[i], dispatched_s)

    workers = {asyncio.create_task(lane()) for _ in range(lanes)}
    i, n = 0, len(offsets)
    while i < n:
        now = sender.now_s()
        if offsets[i] > now:
            # uvloop's timers count whole milliseconds and round shorter sleeps to nothing: a
            # floor of 1 ms keeps this from spinning, at the cost of releases up to 1 ms late
            # (which the latency counts).
            await asyncio.sleep(max(offsets[i] - now, MIN_SLEEP_S))
            continue
        # Everything already due is released at once: a late loop catches up in one burst.
        while i < n and offsets[i] <= now:
            due.put_nowait((i, now))
            i += 1
        await asyncio.sleep(0)  # let the lanes take what was released
    for _ in workers:
        due.put_nowait(None)
    await _drain(workers, drain_s)
    while not due.empty():  # released but never sent: the drain time ran out
        item = due.get_nowait()
        if item is not None:
            sender.give_up(phases[item[0]], offsets[item[0]], item[1], UNFINISHED)


async def run_closed(sender: Sender, plan: LoadPlan, clients: int, drain_s: float) -> None:
    """`clients` loops, each sending its next request as soon as the last is answered."""
    windows = phase_windows(plan.phases)
    end_s = plan.total_s

    def phase_at(t: float) -> int:
        return next((i for i, (_, hi) in enumerate(windows) if t < hi), len(windows) - 1)

    async def client() -> None:
        while (now := sender.now_s()) < end_s:
            await sender.send(phase_at(now), now, now)

    delay_s = -sender.now_s()
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    tasks = {asyncio.create_task(client()) for _ in range(clients)}
    await _drain(tasks, end_s - sender.now_s() + drain_s)


async def _drain(tasks: set[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait up to timeout_s for the tasks, cancel the rest; re-raise the first that failed (a bug,
    which the process boundary reports) rather than losing it."""
    pending = {task for task in tasks if not task.done()}
    if pending and timeout_s > 0:
        _, pending = await asyncio.wait(pending, timeout=timeout_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


class PartResult(NamedTuple):
    records: list[RequestRecord]
    cpu_fraction: float  # of one core, while the schedule ran: near 1, the generator was a limit


async def run_part(
    plan: LoadPlan,
    bodies: Bodies,
    schedule: Schedule | None,
    clients: int,
    start_at: float,
    tally: Tally,
) -> PartResult:
    """One process's share of the run: its slice of the schedule, or its clients."""
    target = parse_target(plan.url)
    drain_s = plan.client_timeout_s + 1.0
    loop = asyncio.get_running_loop()
    marks: list[tuple[float, float]] = []  # (monotonic, process CPU) at the start and the end

    def mark() -> None:
        marks.append((time.monotonic(), time.process_time()))

    # At most `connections` sockets: further requests wait for one, and that wait counts in
    # their latency.
    transport = Transport(plan.connections)
    try:
        sender = Sender(
            transport,
            target,
            infer_path(plan.model),
            bodies,
            plan.client_timeout_s,
            start_at,
            tally,
        )
        loop.call_later(max(0.0, -sender.now_s()), mark)
        end_timer = loop.call_later(max(0.0, plan.total_s - sender.now_s()), mark)
        if plan.mode == OPEN:
            assert schedule is not None
            await run_open(sender, schedule, plan.connections, plan.client_timeout_s, drain_s)
        else:
            await run_closed(sender, plan, clients, drain_s)
        end_timer.cancel()
    finally:
        await transport.close()
    while len(marks) < 2:
        mark()
    (wall_0, cpu_0), (wall_1, cpu_1) = marks[0], marks[-1]
    return PartResult(sender.records, (cpu_1 - cpu_0) / (wall_1 - wall_0) if wall_1 > wall_0 else 0)
