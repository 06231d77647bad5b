"""The stuck-batch watchdog of one worker process: notices a batch running far past its time
limit (`workers.batch_timeout_s`), so that its link (worker_link.py) kills the worker and its
executor handles the batch as for a worker that died; and says which workers are stalled, for
/readyz. BatchLimits holds one executor's limits, shared by its workers' watchdogs.

Event loop only. One timer per worker, armed when a batch starts and none is armed, and re-armed
lazily when it fires: a finished batch costs nothing here, not even a cancel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, Protocol, TypeVar

# workers.batch_timeout_s = 0: the limit is this many times the calibrated cost of a full batch,
# but never under the floor, so that a busy machine (a 40% slowdown for seconds is common on a
# shared 2-core box) or a model's first slow batch never trips it.
AUTO_FACTOR = 50.0
AUTO_FLOOR_S = 5.0
# A worker whose batch has run this fraction of its limit (at least STALL_FLOOR_S) is stalled:
# /readyz says so before the watchdog acts.
STALL_FRACTION = 0.2
STALL_FLOOR_S = 1.0


class Flight(Protocol):
    """A batch in flight, as the watchdog reads it."""

    @property
    def model(self) -> str: ...

    @property
    def started_at(self) -> float: ...


F = TypeVar("F", bound=Flight)


def batch_timeout_s(configured_s: float, full_batch_s: float | None) -> float:
    """The limit for one model: as configured, or (0) derived from its calibrated cost."""
    if configured_s > 0.0:
        return configured_s
    return max(AUTO_FLOOR_S, AUTO_FACTOR * (full_batch_s or 0.0))


def stall_s(limit_s: float) -> float:
    return max(STALL_FLOOR_S, STALL_FRACTION * limit_s)


class BatchLimits:
    """One executor's batch time limits (model -> seconds) and the counter of the kills, shared
    by the watchdogs of its workers; empty until set, so that start-up (loading, warming up,
    timing) is never watched."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.on_timeout: Callable[[str], None] = lambda model: None

    def set(self, limits: Mapping[str, float], on_timeout: Callable[[str], None]) -> None:
        self.seconds.clear()  # in place: the watchdogs hold this dict
        self.seconds.update(limits)
        self.on_timeout = on_timeout


class Watchdog(Generic[F]):
    """`limits`: model -> seconds (models without one are not watched); `on_overdue` is called
    once the oldest batch in flight has run past its limit, and must end the worker."""

    def __init__(self, on_overdue: Callable[[], None]) -> None:
        self._on_overdue = on_overdue
        self._limits: Mapping[str, float] = {}
        self._flights: Callable[[], Iterable[F]] = tuple
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, limits: Mapping[str, float], flights: Callable[[], Iterable[F]]) -> None:
        self._limits, self._flights = limits, flights

    def started(self) -> None:
        """A batch has just been sent to the worker."""
        if self._timer is None and self._limits:  # no limits yet (start-up): nothing to watch
            self._arm(time.monotonic())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def overdue(self, now: float) -> list[F]:
        return [f for f in self._flights() if now - f.started_at >= self._limit(f.model)]

    def stalled_s(self, now: float) -> float | None:
        """How long the worker's oldest batch has run, if that is past its stall mark."""
        ages = [now - f.started_at for f in self._flights()]
        marks = [stall_s(self._limit(f.model)) for f in self._flights()]
        return max((a for a, m in zip(ages, marks, strict=True) if a >= m), default=None)

    def _limit(self, model: str) -> float:
        return self._limits.get(model, float("inf"))

    def _arm(self, now: float) -> None:
        due = min((f.started_at + self._limit(f.model) for f in self._flights()), default=None)
        if due is None or due == float("inf"):
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, due - now), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.monotonic()
        if self.overdue(now):
            self._on_overdue()
        else:
            self._arm(now)
