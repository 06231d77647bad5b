"""The router: a Dispatcher over several executors (the CPU pool and each GPU) that sends every
batch where `policy.choose` expects it to finish first, and learns from each finished batch.

Event loop only; no torch. It keeps its own account of what each executor has in flight (the
expected cost of each batch, and when it started) to estimate backlogs. A batch whose best
executor has no free slot waits here, assigned to it, and goes out when it frees one; the queue
is then told of fewer free slots, so the batcher keeps forming batches rather than emptying
into the router. A batch that failed because its executor died is retried once elsewhere; one
whose executor's device failed under it (device-lost) is always run elsewhere.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from server.clock import Clock
from server.executors.base import (
    Batch,
    BatchDone,
    BatchFailed,
    BatchOutcome,
    Dispatcher,
    DoneCallback,
)
from server.routing.cost import UNKNOWN_COST, CostFit, OnlineCost, Point
from server.routing.policy import Candidate, backlog_s, batch_cost_s, choose

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 2


@dataclass(eq=False)
class Target:
    """One executor as the router sees it. `lanes(model)`: batches it computes at once;
    `cap(model)`: its largest single batch; `alive()`: whether it can take batches at all;
    `retry_elsewhere(failure)`: whether another executor may still answer a batch that failed
    here (a GPU out of memory even at one sample)."""

    name: str
    dispatcher: Dispatcher
    lanes: Callable[[str], int]
    cap: Callable[[str], int]
    alive: Callable[[], bool]
    retry_elsewhere: Callable[[BatchFailed], bool] = lambda failure: False


@dataclass(eq=False)
class _Entry:
    model: str
    samples: int
    cost_s: float
    started_at: float | None = None


@dataclass(eq=False)
class _TargetState:
    target: Target
    entries: list[_Entry] = field(default_factory=list)  # in flight or held, oldest first
    held: deque[tuple[Batch, DoneCallback, _Entry]] = field(default_factory=deque)


class Router:
    """routes: model -> the names of the targets it may use, in preference order (CPU first);
    costs: (model, target name) -> calibration points (cost.Point: (samples, seconds), or
    (samples, length, seconds) for a model with a dynamic dimension)."""

    def __init__(
        self,
        targets: Sequence[Target],
        routes: Mapping[str, Sequence[str]],
        costs: Mapping[tuple[str, str], Sequence[Point]],
        clock: Clock,  # only read: the router sets no timers
        fallback: str = "cpu",
    ) -> None:
        self._states = {t.name: _TargetState(t) for t in targets}
        self._routes = {m: tuple(names) for m, names in routes.items()}
        self._costs = {key: OnlineCost(points) for key, points in costs.items()}
        self._clock = clock
        self._fallback = fallback
        self._listeners: list[Callable[[], None]] = []
        self._since_used: dict[tuple[str, str], int] = {}
        for state in self._states.values():
            state.target.dispatcher.add_capacity_listener(self._on_capacity)

    # Dispatcher protocol -------------------------------------------------------------------
    def free_slots(self, model: str) -> int:
        states = self._usable(model)
        free = sum(max(0, s.target.dispatcher.free_slots(model)) for s in states)
        return max(0, free - sum(len(s.held) for s in states))

    def hold_for_fill(self, model: str) -> bool:
        # Only a GPU-only model waits for batch-mates; with the CPU in the choice a shallow
        # queue is best served at once, and batches grow by themselves under load.
        return all(s.target.name != self._fallback for s in self._usable(model))

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        self._route(batch, done, avoid=None)

    def _route(self, batch: Batch, done: DoneCallback, avoid: str | None) -> None:
        states = self._usable(batch.model, avoid)
        now = self._clock.now()
        candidates = [self._candidate(s, batch, now) for s in states]
        chosen = states[choose(batch.samples, candidates, batch.length)]
        self._note_choice(batch.model, chosen, states)
        cap = chosen.target.cap(batch.model)
        fit = self.cost(batch.model, chosen.target.name)
        cost = batch_cost_s(fit, batch.samples, cap, batch.length)
        entry = _Entry(batch.model, batch.samples, cost)
        chosen.entries.append(entry)
        if chosen.held or chosen.target.dispatcher.free_slots(batch.model) <= 0:
            chosen.held.append((batch, done, entry))
            return
        self._send(chosen, batch, done, entry, now)

    # Costs ---------------------------------------------------------------------------------
    def cost(self, model: str, target: str) -> CostFit:
        online = self._costs.get((model, target))
        return online.fit if online is not None else UNKNOWN_COST

    def costs(self) -> dict[tuple[str, str], tuple[CostFit, CostFit, int]]:
        """(model, target) -> (calibrated fit, current fit, batches observed)."""
        return {k: (c.calibrated, c.fit, c.observed) for k, c in self._costs.items()}

    def route(self, model: str) -> tuple[str, ...]:
        """The executors this model may use, as configured (the dead ones included)."""
        return self._routes.get(model, (self._fallback,))

    def in_flight(self, target: str) -> int:
        return len(self._states[target].entries)

    # Internals -----------------------------------------------------------------------------
    def _usable(self, model: str, avoid: str | None = None) -> list[_TargetState]:
        names = self._routes.get(model, (self._fallback,))
        states = [self._states[n] for n in names if n in self._states and n != avoid]
        alive = [s for s in states if s.target.alive()]
        return alive or [self._states[self._fallback]]

    def _candidate(self, state: _TargetState, batch: Batch, now: float) -> Candidate:
        target = state.target
        lanes = target.lanes(batch.model)
        running = [(e.started_at, e.cost_s) for e in state.entries if e.started_at is not None]
        waiting = [e.cost_s for e in state.entries if e.started_at is None]
        return Candidate(
            target.name,
            backlog_s(now, lanes, running, waiting),
            self.cost(batch.model, target.name),
            target.cap(batch.model),
            target.dispatcher.free_slots(batch.model) - len(state.held),
            idle=not state.entries,
            batches_since_used=self._since_used.get((batch.model, target.name), 0),
        )

    def _note_choice(self, model: str, chosen: _TargetState, states: list[_TargetState]) -> None:
        for state in states:
            key = (model, state.target.name)
            self._since_used[key] = 0 if state is chosen else self._since_used.get(key, 0) + 1

    def _send(
        self, state: _TargetState, batch: Batch, done: DoneCallback, entry: _Entry, now: float
    ) -> None:
        running = sum(1 for e in state.entries if e.started_at is not None)
        if running < state.target.lanes(batch.model):
            entry.started_at = now

        def finished(batch: Batch, outcome: BatchOutcome) -> None:
            self._finished(state, entry, batch, outcome, done)

        state.target.dispatcher.dispatch(batch, finished)

    def _finished(
        self,
        state: _TargetState,
        entry: _Entry,
        batch: Batch,
        outcome: BatchOutcome,
        done: DoneCallback,
    ) -> None:
        now = self._clock.now()
        state.entries.remove(entry)
        self._promote(state, batch.model, now)
        if isinstance(outcome, BatchDone):
            online = self._costs.get((batch.model, state.target.name))
            if online is not None:
                online.observe(batch.samples, outcome.compute_s, batch.length)
        elif self._retry_elsewhere(state.target, batch, outcome):
            log.warning(
                "a batch of %d samples of model %r failed on %s (%s); retrying it elsewhere",
                batch.samples,
                batch.model,
                state.target.name,
                outcome.message,
            )
            self._route(batch, done, avoid=state.target.name)
            return
        done(batch, outcome)

    def _retry_elsewhere(self, target: Target, batch: Batch, failure: BatchFailed) -> bool:
        if target.name == self._fallback:
            return False  # the CPU pool retries its own crashed workers
        if failure.device_lost and not target.alive():
            # Not bounded by MAX_ATTEMPTS: the batch did not fail, the device did. This ends: a
            # dead target is never chosen again, so a batch meets each lost GPU at most once
            # before it reaches the CPU, which never reports a lost device.
            return True
        if batch.attempts >= MAX_ATTEMPTS:
            return False
        return not target.alive() or target.retry_elsewhere(failure)

    def _promote(self, state: _TargetState, model: str, now: float) -> None:
        """The oldest batch sent and not yet started takes the lane just freed."""
        running = sum(1 for e in state.entries if e.started_at is not None)
        if running >= state.target.lanes(model):
            return
        held = {id(h[2]) for h in state.held}
        for entry in state.entries:
            if entry.started_at is None and id(entry) not in held:
                entry.started_at = now
                return

    def _on_capacity(self) -> None:
        now = self._clock.now()
        for state in self._states.values():
            while state.held:
                batch, done, entry = state.held[0]
                if not state.target.alive():
                    state.held.popleft()
                    state.entries.remove(entry)
                    self.dispatch(batch, done)  # its executor is gone: choose again
                    continue
                if state.target.dispatcher.free_slots(batch.model) <= 0:
                    break
                state.held.popleft()
                self._send(state, batch, done, entry, now)
        for listener in self._listeners:
            listener()
