"""One worker process as the event loop sees it, for the CPU pool and the CUDA executor alike:
spawn it, read its messages, send it batches and keep them in flight by sequence number, notice
its death or a batch stuck past its time limit (watchdog.py: the worker is killed), reap it and
close it. What a death means is the executor's to decide: the link hands it the batches that
were on the worker (the pool replaces the worker and retries them; a GPU is left out).

Event loop only; no torch. One os.read per wake-up, the framing parsed here (framing.py):
Connection.poll + recv_bytes would cost three system calls per message, and system calls
dominate the per-batch cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from server.executors.base import Batch, DoneCallback
from server.executors.contract import (
    Done,
    Failed,
    Loaded,
    LoadFailed,
    Ready,
    Run,
    ServerMessage,
    Stop,
    decode_from_worker,
    encode,
)
from server.executors.framing import FrameReader
from server.executors.reaper import reap
from server.executors.watchdog import BatchLimits, Watchdog

log = logging.getLogger(__name__)


class Flight:
    """A batch sent to a worker and not yet answered."""

    __slots__ = ("batch", "done", "slot", "started_at", "timed_out")

    def __init__(self, batch: Batch, done: DoneCallback, slot: int) -> None:
        self.batch, self.done, self.slot = batch, done, slot
        self.started_at = time.monotonic()
        self.timed_out = False  # the watchdog killed its worker

    @property
    def model(self) -> str:
        return self.batch.model


class LinkOwner(Protocol):
    """The executor behind a link: its policy, called on the event loop."""

    def on_message(self, link: WorkerLink, message: Loaded | LoadFailed | Ready) -> None:
        """A start-up message (Ready has already made the link ready)."""

    def on_result(self, link: WorkerLink, flight: Flight, message: Done | Failed) -> None:
        """A batch's answer; the flight is no longer the link's."""

    def on_lost(self, link: WorkerLink, flights: list[Flight]) -> None:
        """The worker is gone (its pipe closed or broke, or the watchdog killed it): the link
        is closed and the process being reaped; `flights` were on it."""


class WorkerLink:
    """`name` says which worker in the logs ("CPU worker 0", "the cuda:0 worker"); `index` is
    the executor's own number for it."""

    def __init__(self, name: str, index: int, owner: LinkOwner, limits: BatchLimits) -> None:
        self.name, self.index = name, index
        self.process: BaseProcess | None = None
        self.flights: dict[int, Flight] = {}  # by sequence number
        self.alive = False  # the pipe is open
        self.ready = False  # it has reported Ready, and is alive
        self._owner = owner
        self._limits = limits
        self._conn: Connection | None = None
        self._frames = FrameReader()
        self._seq = itertools.count()
        self._watchdog = Watchdog[Flight](self._on_overdue)
        self._watchdog.watch(limits.seconds, self.flights.values)

    def start(self, entry: Callable[[Connection, Any], None], setup: object, title: str) -> None:
        """Spawns the worker process: entry(its end of the pipe, setup), named `title`."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=entry, args=(child, setup), name=title, daemon=True)
        self.process.start()
        # Our copy of the child's end must go, or its death would never read as EOF here.
        child.close()
        self._conn, self.alive = parent, True
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_readable)
        log.info("started %s (pid %s)", self.name, self.process.pid)

    def send(self, message: ServerMessage) -> None:
        """Raises OSError when the pipe is closed or broken."""
        if self._conn is None or self._conn.closed:
            raise OSError(f"the pipe to {self.name} is closed")
        self._conn.send_bytes(encode(message))

    def run(self, batch: Batch, done: DoneCallback, slot: int) -> None:
        """Sends a batch already staged in `slot`; its answer goes to the owner's on_result, or
        with the others to on_lost (at once, if the pipe turns out to be broken)."""
        seq = next(self._seq)
        self.flights[seq] = Flight(batch, done, slot)
        batch.attempts += 1
        try:
            self.send(Run(seq, slot, batch.model, batch.samples, batch.length))
        except OSError:
            self.lose()
            return
        self._watchdog.started()

    def stalled_s(self, now: float) -> float | None:
        """How long its oldest batch has run, if that is past its stall mark (watchdog.py)."""
        return self._watchdog.stalled_s(now)

    # Endings ------------------------------------------------------------------------------
    def close(self, stop: bool = False) -> None:
        """No more messages either way; with `stop`, the worker is first asked to finish."""
        if not self.alive:
            return
        self.alive = self.ready = False
        self._watchdog.stop()
        assert self._conn is not None
        asyncio.get_running_loop().remove_reader(self._conn.fileno())
        if stop:
            with contextlib.suppress(OSError):
                self.send(Stop())
        self._conn.close()

    def end(self) -> list[Flight]:
        """Closes the link for a worker that is gone or going, collects its exit status once it
        has one (reaper.py), and returns the batches that were on it."""
        self.close()
        if self.process is not None:
            reap(self.process)
        return self.take_flights()

    def take_flights(self) -> list[Flight]:
        """The batches in flight, which are the caller's to answer from now on."""
        flights = list(self.flights.values())
        self.flights.clear()
        return flights

    def lose(self) -> None:
        """The worker is gone: ended, and its batches handed to the owner."""
        if self.alive:
            self._owner.on_lost(self, self.end())

    def kill(self) -> None:
        """SIGKILL (certain, unlike a stop request), then handled as a death."""
        if self.process is not None and self.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
        self.lose()

    async def join(self, timeout_s: float) -> None:
        """Waits for the process to exit, and kills it if it has not within timeout_s."""
        process = self.process
        if process is None:
            return
        await asyncio.to_thread(process.join, timeout_s)
        if process.is_alive():
            log.warning(
                "%s (pid %s) did not stop in %.0f s; killing it", self.name, process.pid, timeout_s
            )
            process.kill()
            await asyncio.to_thread(process.join, 1.0)

    # Events -------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        assert self._conn is not None
        try:
            chunk = os.read(self._conn.fileno(), 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            self.lose()
            return
        for payload in self._frames.feed(chunk):
            if not self.alive:
                return
            message = decode_from_worker(payload)
            if isinstance(message, (Done, Failed)):
                self._owner.on_result(self, self.flights.pop(message.seq), message)
            else:
                if isinstance(message, Ready):
                    self.ready = True
                self._owner.on_message(self, message)

    def _on_overdue(self) -> None:
        """The watchdog: a batch ran past its limit. The worker is killed and handled as dead."""
        now = time.monotonic()
        for flight in self._watchdog.overdue(now):
            flight.timed_out = True
            self._limits.on_timeout(flight.model)
            log.error(
                "%s (pid %s) has run a batch of %d samples of model %r for %.1f s, past "
                "workers.batch_timeout_s (%.1f s); killing it",
                self.name,
                self.process.pid if self.process is not None else None,
                flight.batch.samples,
                flight.model,
                now - flight.started_at,
                self._limits.seconds[flight.model],
            )
        self.kill()
