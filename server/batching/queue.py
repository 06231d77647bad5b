"""One model's queue: admission, expiry, batch formation and answering each request.

Event loop only; no torch. Release decisions come from the pure `policy.decide`; this class
only waits (a coalesced call_soon, or a timer at the next deadline), pops and dispatches.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from server.batching.pending import PendingRequest, RequestResult, reject, resolve
from server.batching.policy import QueueSnapshot, decide
from server.clock import Clock, Timer
from server.config import BatchingConfig
from server.errors import DeadlineExceeded, Overloaded, ShuttingDown, error_for_code
from server.executors.base import Batch, BatchDone, BatchOutcome, Dispatcher
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
    ) -> None:
        self.model = model
        self.settings = settings
        self._dispatcher = dispatcher
        self._clock = clock
        self._loop = loop
        self._metrics = metrics
        self._pending: deque[PendingRequest] = deque()
        self._queued_samples = 0
        self._in_flight_samples = 0
        self._pump_scheduled = False
        self._timer: Timer | None = None
        self._timer_at = float("inf")
        self._closed = False
        # A lower bound on the queued deadlines (exact after each sweep), so that the common
        # case of nothing expired costs one comparison rather than a scan.
        self._earliest_deadline = float("inf")
        self._drain_rate = _DrainRate()
        self._idle = asyncio.Event()
        self._idle.set()
        dispatcher.add_capacity_listener(self._schedule_pump)

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    @property
    def outstanding_samples(self) -> int:
        """Admitted and not yet answered: queued or in an executor."""
        return self._queued_samples + self._in_flight_samples

    def submit(self, request: PendingRequest) -> None:
        """Admit a request or raise (503) at once; its future is answered later."""
        if self._closed:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        limit = self.settings.max_queue_size
        if self._queued_samples + request.samples > limit:
            raise Overloaded(
                f"model {self.model!r} has {self._queued_samples} samples queued, limit {limit}",
                retry_after_s=self._drain_rate.seconds_to_drain(self._queued_samples),
            )
        self._pending.append(request)
        self._queued_samples += request.samples
        self._earliest_deadline = min(self._earliest_deadline, request.deadline_at)
        self._idle.clear()
        self._schedule_pump()

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

    def _schedule_pump(self) -> None:
        # Coalesced: every handler that runs in this loop iteration enqueues first, then one
        # pump forms one batch from all of them; a lone request is not delayed.
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        now = self._clock.now()
        self._expire(now)
        self._note_idle()
        while self._pending:
            decision = decide(
                QueueSnapshot(
                    now=now,
                    queued_samples=self._queued_samples,
                    oldest_arrival_at=self._pending[0].arrived_at,
                    free_slots=self._dispatcher.free_slots(self.model),
                    max_batch_size=self.settings.max_batch_size,
                    max_delay_s=self.settings.max_delay_ms / 1000.0,
                    hold_for_fill=self._dispatcher.hold_for_fill(self.model),
                )
            )
            if not decision.release:
                self._arm_timer(decision.wake_at)
                return
            batch = self._take(now)
            if batch is not None:
                self._dispatcher.dispatch(batch, self._finish)

    def _take(self, now: float) -> Batch | None:
        requests: list[PendingRequest] = []
        samples = 0
        limit = self.settings.max_batch_size
        while self._pending and samples + self._pending[0].samples <= limit:
            request = self._pending.popleft()
            self._queued_samples -= request.samples
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
        self._in_flight_samples += samples
        return Batch(self.model, requests, samples)

    def _expire(self, now: float) -> None:
        """Answer 504 for every queued request whose deadline has passed; it is never computed."""
        if self._earliest_deadline > now:
            return
        kept: deque[PendingRequest] = deque()
        for request in self._pending:
            if request.deadline_at <= now:
                self._queued_samples -= request.samples
                self._metrics.request_dropped(self.model, "deadline")
                waited_ms = (now - request.arrived_at) * 1000.0
                reject(
                    request.future,
                    DeadlineExceeded(
                        f"deadline passed after {waited_ms:.1f} ms in the queue of model "
                        f"{self.model!r}; the request was not computed"
                    ),
                )
            else:
                kept.append(request)
        self._pending = kept
        self._earliest_deadline = min((r.deadline_at for r in kept), default=float("inf"))

    def _arm_timer(self, wake_at: float | None) -> None:
        deadline = self._earliest_deadline
        at = deadline if wake_at is None else min(wake_at, deadline)
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
        """Answer every request of a batch from its one outcome."""
        self._in_flight_samples -= batch.samples
        self._note_idle()
        now = self._clock.now()
        self._drain_rate.record(now, batch.samples)
        if not isinstance(outcome, BatchDone):
            error = error_for_code(outcome.code, outcome.message)
            for request in batch.requests:
                reject(request.future, error)
            self._metrics.batch_failed(self.model, batch.samples)
            return
        compute_ms = outcome.compute_s * 1000.0
        offset = 0
        for request in batch.requests:
            end = offset + request.samples
            if request.single:
                outputs = {name: arr[offset] for name, arr in outcome.outputs.items()}
            else:
                outputs = {name: arr[offset:end] for name, arr in outcome.outputs.items()}
            offset = end
            queue_ms = (request.dispatched_at - request.arrived_at) * 1000.0
            resolve(
                request.future,
                RequestResult(outputs, batch.samples, outcome.device, queue_ms, compute_ms),
            )
        self._metrics.batch_done(self.model, outcome.device, batch, outcome.compute_s)


class _DrainRate:
    """Samples answered per second (a moving average), for Retry-After on overload."""

    def __init__(self) -> None:
        self._rate = 0.0
        self._last_at: float | None = None

    def record(self, now: float, samples: int) -> None:
        if self._last_at is not None and now > self._last_at:
            instant = samples / (now - self._last_at)
            self._rate = instant if self._rate == 0.0 else 0.9 * self._rate + 0.1 * instant
        self._last_at = now

    def seconds_to_drain(self, queued: int) -> float:
        if self._rate <= 0.0:
            return 1.0
        return max(0.001, queued / self._rate)
