"""Test doubles for the batcher's collaborators: a clock that moves only when told, and an
executor whose batches finish only when the test says so. The BatchQueue under test is real.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.executors.base import Batch, BatchDone, BatchFailed, DoneCallback


class _FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._timers: list[tuple[float, int, _FakeTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def call_at(self, when: float, callback: Callable[[], None]) -> _FakeTimer:
        timer = _FakeTimer()
        heapq.heappush(self._timers, (when, next(self._seq), timer, callback))
        return timer

    def advance(self, dt: float) -> None:
        self.t += dt
        while self._timers and self._timers[0][0] <= self.t:
            _, _, timer, callback = heapq.heappop(self._timers)
            if not timer.cancelled:
                callback()


@dataclass
class FakeExecutor:
    """Runs `output = 2 * input` when the test calls finish(); counts slots like a pool."""

    slots: int = 1
    hold: bool = False
    running: list[tuple[Batch, DoneCallback]] = field(default_factory=list)
    dispatched: list[Batch] = field(default_factory=list)
    listeners: list[Callable[[], None]] = field(default_factory=list)

    def free_slots(self, model: str) -> int:
        return self.slots - len(self.running)

    def hold_for_fill(self, model: str) -> bool:
        return self.hold

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        assert batch.samples <= 10_000
        self.running.append((batch, done))
        self.dispatched.append(batch)

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def finish(self, index: int = 0, fail: str | None = None) -> Batch:
        batch, done = self.running.pop(index)
        if fail:
            done(batch, BatchFailed("model_error", fail))
        else:
            x = np.concatenate([r.inputs["input"] for r in batch.requests])
            done(batch, BatchDone({"output": x * 2}, 0.001, "fake"))
        for listener in self.listeners:
            listener()
        return batch
