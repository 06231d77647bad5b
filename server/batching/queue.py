"""One model's queue: admission, expiry, batch formation and answering each request.

Event loop only; no torch. Release decisions come from the pure `policy.decide`, admission from
`admission.admit`, batch times from `estimate.BatchTime`, and the halves of a poisoned batch
from `bisection.halves`; this class only waits (a coalesced call_soon, or a timer at the next
deadline, queued or in flight), pops and dispatches.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque

from server.batching.admission import Admission, admit, may_shed
from server.batching.answers import answer_each, non_finite_samples
from server.batching.backlog import Backlog
from server.batching.bisection import halves, should_bisect
from server.batching.estimate import BatchTime, Prior
from server.batching.lengths import Lengths
from server.batching.pending import PendingRequest, RequestResult, reject
from server.batching.policy import QueueSnapshot, decide
from server.batching.running import Running
from server.clock import Clock, Timer
from server.config import BatchingConfig
from server.errors import DeadlineExceeded, Overloaded, ServingError, ShuttingDown, error_for_code
from server.executors.base import Batch, BatchDone, BatchFailed, BatchOutcome, Dispatcher
from server.metrics import Metrics

log = logging.getLogger(__name__)


class BatchQueue:
    def __init__(
        self,
        model: str,
        settings: BatchingConfig,
        dispatcher: Dispatcher,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics,
        calibrated: Prior | None = None,
        lengths: Lengths | None = None,
    ) -> None:
        """`calibrated`: the model's calibrated batch cost (seconds for n samples padded to a
        length), where there is one: what the batch-time estimate returns to once its
        evidence is old. `lengths`: for a model with a dynamic dimension, how its batches are
        formed by length and its answers cut to each request's length."""
        self.model = model
        self.settings = settings
        self._dispatcher = dispatcher
        self._clock = clock
        self._loop = loop
        self._metrics = metrics
        self._pending: deque[PendingRequest] = deque()
        self._backlog = Backlog()
        self._pump_scheduled = False
        self._pumping = False
        self._timer: Timer | None = None
        self._timer_at = float("inf")
        self._closed = False
        # A lower bound on the queued deadlines (exact after each sweep), so that the common
        # case of nothing expired costs one comparison rather than a scan.
        self._earliest_deadline = float("inf")
        self._estimate = BatchTime(calibrated)
        self._lengths = lengths
        self._running = Running()
        # Halves of poisoned batches (still counted in flight), run ahead of everything queued.
        self._retries: deque[list[PendingRequest]] = deque()
        self._idle = asyncio.Event()
        self._idle.set()
        dispatcher.add_capacity_listener(self._on_capacity)

    @property
    def queued_samples(self) -> int:
        return self._backlog.queued

    @property
    def outstanding_samples(self) -> int:
        """Admitted and not yet answered: queued or in an executor."""
        return self._backlog.outstanding

    def submit(self, request: PendingRequest) -> None:
        """Admit a request or raise (503) at once; its future is answered later."""
        self._admit(request.samples, request.deadline_at, request.length)
        self._pending.append(request)
        self._backlog.enqueue(request)
        self._earliest_deadline = min(self._earliest_deadline, request.deadline_at)
        self._idle.clear()
        self._schedule_pump()

    def new_future(self) -> asyncio.Future[RequestResult]:
        """A future for a request's answer, on this queue's loop: asyncio.get_running_loop()
        makes a getpid system call each time (CPython 3.11), once per request on the hot path."""
        return self._loop.create_future()

    def refuse_early(self) -> None:
        """Raise (503) when even a one-sample request would be refused: called before the body
        is read, so that shedding costs no reading or decoding."""
        self._admit(1, float("inf"))

    def _admit(self, samples: int, deadline_at: float, length: int = 1) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        settings, backlog = self.settings, self._backlog
        if not may_shed(backlog.queued, samples, settings.max_queue_size, deadline_at):
            return
        shed = admit(
            Admission(
                self._clock.now(),
                samples,
                deadline_at,
                backlog.queued,
                backlog.in_flight,
                settings.max_queue_size,
                self._estimate,
                settings.max_batch_size,
                length,
                backlog.queued_tokens,
                backlog.in_flight_tokens,
            )
        )
        if shed is not None:
            raise Overloaded(
                f"model {self.model!r}: {shed.message}", retry_after_s=shed.retry_after_s
            )

    async def wait_idle(self) -> None:
        """Until nothing admitted is left unanswered."""
        await self._idle.wait()

    def _note_idle(self) -> None:
        if self.outstanding_samples == 0:
            self._idle.set()
        else:
            self._idle.clear()

    def close(self) -> None:
        """Refuse new requests; those admitted still run."""
        self._closed = True

    def abort(self, error: ServingError) -> None:
        """Answer everything not yet in an executor with `error` (the drain ran out of time);
        batches in an executor are answered when the executor stops."""
        self._closed = True
        for request in self._pending:
            reject(request.future, error)
        for group in self._retries:
            self._backlog.end(group)
            for request in group:
                reject(request.future, error)
        self._pending.clear()
        self._retries.clear()
        self._backlog.clear_queue()
        self._earliest_deadline = float("inf")
        self._note_idle()

    def _schedule_pump(self) -> None:
        # Coalesced: every handler that runs in this loop iteration enqueues first, then one
        # pump forms one batch from all of them; a lone request is not delayed.
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _on_capacity(self) -> None:
        # A freed slot is filled at once, not after the handlers its batch just woke: those
        # write their responses first, and the executor would idle all that while.
        if self._pumping:
            self._schedule_pump()
        else:
            self._pump()

    def _pump(self) -> None:
        self._pumping = True
        try:
            self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        self._pump_scheduled = False
        now = self._clock.now()
        self._expire_running(now)
        self._expire(now)
        self._run_retries(now)
        self._note_idle()
        wake_at: float | None = None
        while self._pending:
            decision = decide(
                QueueSnapshot(
                    now=now,
                    queued_samples=self._backlog.queued,
                    oldest_arrival_at=self._pending[0].arrived_at,
                    free_slots=self._dispatcher.free_slots(self.model),
                    max_batch_size=self.settings.max_batch_size,
                    max_delay_s=self.settings.max_delay_ms / 1000.0,
                    hold_for_fill=self._dispatcher.hold_for_fill(self.model),
                )
            )
            if not decision.release:
                wake_at = decision.wake_at
                break
            batch = self._take(now)
            if batch is not None:
                self._send(batch, now)
        self._arm_timer(now, wake_at)

    def _send(self, batch: Batch, now: float) -> None:
        # Before dispatch: `done` may be called within it.
        earliest = min(r.deadline_at for r in batch.requests)
        self._running.add(batch, now, earliest)
        self._dispatcher.dispatch(batch, self._finish)

    def _expire_running(self, now: float) -> None:
        """504 at its deadline for a request whose batch has not come back (a stopped or stuck
        worker): the answer, if it ever comes, then finds the request answered."""
        for request, running_s in self._running.overdue(now):
            self._metrics.request_dropped(self.model, "deadline_running")
            reject(
                request.future,
                DeadlineExceeded(
                    f"deadline passed while its batch of model {self.model!r} was running "
                    f"(for {running_s * 1000.0:.0f} ms so far)"
                ),
            )

    def _run_retries(self, now: float) -> None:
        while self._retries and self._dispatcher.free_slots(self.model) > 0:
            live: list[PendingRequest] = []
            for request in self._retries.popleft():
                if request.is_gone() or request.deadline_at <= self._cutoff(now, request.length):
                    self._backlog.end((request,))
                    self._drop(request, now)
                else:
                    live.append(request)
            if live:
                self._send(self._batch(live, sum(r.samples for r in live)), now)

    def _cutoff(self, now: float, length: int = 1) -> float:
        """Deadlines up to this are lost: a batch dispatched now, padded to `length`, would
        answer after them. The sweep's shortcut and the timer go by length 1, the earliest
        cutoff (so a fixed shape is judged as before, and the timer never spins); whenever the
        sweep runs, each request of a dynamic model is judged at its own length."""
        samples = min(self._backlog.queued, self.settings.max_batch_size)
        idle = self._backlog.in_flight == 0
        return now + self._estimate.batch_s(now, samples, length, idle=idle)

    def _drop(self, request: PendingRequest, now: float) -> None:
        """A request that will not be computed: its client left, or its deadline passed or
        would pass before a batch dispatched now could answer (504)."""
        if request.is_gone():
            if request.future.cancelled():  # else answered already: 504 while it ran
                self._metrics.request_dropped(self.model, "client_gone")
            return
        self._metrics.request_dropped(self.model, "deadline")
        waited_ms = (now - request.arrived_at) * 1000.0
        why = "passed"
        if request.deadline_at > now:
            expected_ms = (self._cutoff(now, request.length) - now) * 1000.0
            why = f"would pass before its batch finished (a batch takes about {expected_ms:.1f} ms)"
        reject(
            request.future,
            DeadlineExceeded(
                f"deadline {why} after {waited_ms:.1f} ms in the queue of model "
                f"{self.model!r}; the request was not computed"
            ),
        )

    def _batch(self, requests: list[PendingRequest], samples: int) -> Batch:
        length = 1 if self._lengths is None else max(r.length for r in requests)
        return Batch(self.model, requests, samples, length)

    def _take(self, now: float) -> Batch | None:
        requests: list[PendingRequest] = []
        samples = 0
        for request in self._next_requests():
            self._backlog.dequeue(request)
            if request.is_gone():
                self._metrics.request_dropped(self.model, "client_gone")
                continue
            request.dispatched_at = now
            requests.append(request)
            samples += request.samples
        if not self._pending:
            self._earliest_deadline = float("inf")
        if not requests:
            self._note_idle()
            return None
        self._backlog.start(requests)
        return self._batch(requests, samples)

    def _next_requests(self) -> list[PendingRequest]:
        """The requests of the next batch, taken from the queue: the oldest that fit, or for a
        model with a dynamic dimension, those its length policy picks among the oldest."""
        pending, limit = self._pending, self.settings.max_batch_size
        if self._lengths is None:
            taken, samples = [], 0
            while pending and samples + pending[0].samples <= limit:
                taken.append(pending.popleft())
                samples += taken[-1].samples
            return taken
        return self._lengths.take(pending, limit)

    def _expire(self, now: float) -> None:
        """Answer 504 for every queued request whose deadline is lost; it is never computed."""
        if not self._pending or self._earliest_deadline > (cutoff := self._cutoff(now)):
            return  # nothing queued (no estimate asked), or nothing lost
        kept: deque[PendingRequest] = deque()
        for request in self._pending:
            if request.deadline_at <= cutoff or (
                request.length > 1 and request.deadline_at <= self._cutoff(now, request.length)
            ):
                self._backlog.dequeue(request)
                self._drop(request, now)
            else:
                kept.append(request)
        self._pending = kept
        self._earliest_deadline = min((r.deadline_at for r in kept), default=float("inf"))

    def _arm_timer(self, now: float, wake_at: float | None) -> None:
        """One timer: the next release, queued deadline or in-flight deadline, whichever first."""
        at = self._running.earliest_deadline_at
        if self._earliest_deadline != math.inf:
            # A queued request is lost once a batch dispatched then would answer too late.
            at = min(at, self._earliest_deadline - (self._cutoff(now) - now))
        if wake_at is not None:
            at = min(at, wake_at)
        if at == float("inf"):
            return
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._clock.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._pump()

    def _finish(self, batch: Batch, outcome: BatchOutcome) -> None:
        """Answer every request of a batch from its one outcome, or retry the halves of a batch
        the model raised on, so that only the request(s) that make it raise fail."""
        tokens = self._backlog.end(batch.requests)
        now = self._clock.now()
        # A batch that ran twice (its worker died) timed a restart, not the model.
        clean = isinstance(outcome, BatchDone) and batch.attempts <= 1
        dispatched_at = self._running.pop(batch, now)
        self._estimate.record(now, dispatched_at, batch.samples, batch.length, tokens, clean=clean)
        if isinstance(outcome, BatchDone):
            self._answer(batch, outcome)
        elif should_bisect(outcome.code, outcome.model_raised, len(batch.requests)):
            self._bisect(batch, outcome)
        else:
            self._fail(batch, outcome)
        self._note_idle()  # after any retry is counted in flight, or a drain would end early

    def _answer(self, batch: Batch, outcome: BatchDone) -> None:
        non_finite = non_finite_samples(outcome.outputs)
        if non_finite:
            self._metrics.non_finite_outputs(self.model, non_finite)
        answer_each(batch, outcome, self._lengths)
        self._metrics.batch_done(self.model, outcome.device, batch, outcome.compute_s)
        if self._lengths is not None:
            self._metrics.padded_batch(self.model, batch)

    def _bisect(self, batch: Batch, outcome: BatchFailed) -> None:
        self._metrics.batch_failed(self.model, outcome.device, batch.samples)
        first, second = halves(batch.requests, [r.samples for r in batch.requests])
        self._retries.extend((first, second))
        self._backlog.start(batch.requests)
        log.info(
            "model %r raised on a batch of %d requests (%s); running halves of %d and %d "
            "requests to find the culprit",
            self.model,
            len(batch.requests),
            outcome.message,
            len(first),
            len(second),
        )
        self._schedule_pump()

    def _fail(self, batch: Batch, outcome: BatchFailed) -> None:
        error = error_for_code(outcome.code, outcome.message)
        for request in batch.requests:
            reject(request.future, error)
        self._metrics.batch_failed(self.model, outcome.device, batch.samples)
        if outcome.model_raised:
            for request in batch.requests:
                log.info(
                    "request %s to model %r makes it raise: %s",
                    request.request_id,
                    self.model,
                    outcome.message,
                )
