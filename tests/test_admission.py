"""Admission: the pure shedding rule (queue limit, and a deadline the backlog would miss), and
the queue refusing early and cheaply. Numbers and a fake clock."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from server.batching.admission import UNKNOWN_RETRY_AFTER_S, Admission, admit, may_shed
from server.batching.pending import PendingRequest, RequestResult
from server.batching.queue import BatchQueue
from server.config import BatchingConfig
from server.errors import DeadlineExceeded, Overloaded, ShuttingDown
from server.metrics import Metrics
from tests.fakes import FakeClock, FakeExecutor


class Measured:
    """An estimate that has measured a drain rate and a batch time (0: not yet)."""

    def __init__(self, drain_rate: float, batch_s: float) -> None:
        self.drain_rate, self.seconds = drain_rate, batch_s

    def rate(self, now: float) -> float:
        return self.drain_rate

    def batch_s(self, now: float, samples: int, length: int = 1, *, idle: bool = False) -> float:
        return self.seconds


def snapshot(drain_rate: float = 100.0, batch_s: float = 0.05, **changes: float) -> Admission:
    base = {
        "now": 100.0,
        "samples": 1,
        "deadline_at": 101.0,
        "queued_samples": 0,
        "in_flight_samples": 0,
        "max_queue_size": 64,
    }
    fields = {"length": 1, **base, **changes}
    # A fixed shape unless told: a sample is one token.
    fields.setdefault("queued_tokens", fields["queued_samples"])
    fields.setdefault("in_flight_tokens", fields["in_flight_samples"])
    return Admission(**fields, estimate=Measured(drain_rate, batch_s), batch_samples=8)  # type: ignore[arg-type]


def test_an_empty_queue_admits_whatever_the_deadline() -> None:
    assert admit(snapshot(deadline_at=100.001, in_flight_samples=8)) is None


def test_the_queue_limit_holds_and_retry_after_follows_the_drain_rate() -> None:
    shed = admit(snapshot(queued_samples=60, samples=5, drain_rate=30.0))
    assert shed is not None and shed.reason == "queue_full"
    assert shed.retry_after_s == pytest.approx(2.0)
    assert admit(snapshot(queued_samples=59, samples=5, deadline_at=1e9)) is None


def test_nothing_measured_yet_admits_up_to_the_limit_and_says_retry_in_a_second() -> None:
    assert admit(snapshot(queued_samples=63, drain_rate=0.0, deadline_at=100.0001)) is None
    shed = admit(snapshot(queued_samples=64, drain_rate=0.0))
    assert shed is not None and shed.retry_after_s == UNKNOWN_RETRY_AFTER_S


def test_a_backlog_that_would_outlast_the_deadline_is_shed_at_once() -> None:
    # 40 queued + 8 in flight + 1 at 60% of 100 samples/s, plus one batch: done at +0.8667 s.
    args = {"queued_samples": 40, "in_flight_samples": 8, "drain_rate": 100.0, "batch_s": 0.05}
    assert admit(snapshot(**args, deadline_at=100.867)) is None
    shed = admit(snapshot(**args, deadline_at=100.866))
    assert shed is not None and shed.reason == "deadline"
    assert "past this request's deadline" in shed.message
    assert shed.retry_after_s == pytest.approx(0.4)  # until the 40 queued have drained


def test_without_a_deadline_only_the_queue_limit_holds() -> None:
    # What refuse_early asks before the body is read: the deadline comes with the body.
    backlog = {"queued_samples": 60, "in_flight_samples": 8, "drain_rate": 1.0, "batch_s": 9.0}
    assert admit(snapshot(**backlog, deadline_at=math.inf)) is None
    shed = admit(snapshot(**backlog, samples=5, deadline_at=math.inf))
    assert shed is not None and shed.reason == "queue_full"


def make_queue(ex: FakeExecutor, clock: FakeClock, limit: int = 64) -> BatchQueue:
    cfg = BatchingConfig(max_batch_size=4, max_delay_ms=5.0, max_queue_size=limit, timeout_ms=1e3)
    return BatchQueue("m", cfg, ex, clock, asyncio.get_running_loop(), Metrics())


def make_request(clock: FakeClock, timeout_s: float) -> PendingRequest:
    future: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
    x = np.zeros((1, 1), np.float32)
    return PendingRequest({"input": x}, 1, False, clock.now(), clock.now() + timeout_s, future)


async def test_the_queue_sheds_what_its_measured_backlog_would_make_late() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock)
    for _ in range(3):  # three batches of 4, 0.1 s each: 40 samples/s
        for _ in range(4):
            q.submit(make_request(clock, 10.0))
        await asyncio.sleep(0)
        clock.advance(0.1)
        ex.finish()
    await asyncio.sleep(0)
    for _ in range(4):  # in flight
        q.submit(make_request(clock, 10.0))
    await asyncio.sleep(0)
    for _ in range(8):  # queued: 12 samples ahead of the next request, about 0.54 s at 60%
        q.submit(make_request(clock, 10.0))
    with pytest.raises(Overloaded, match="past this request's deadline") as info:
        q.submit(make_request(clock, 0.2))
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    q.submit(make_request(clock, 1.0))  # a looser deadline is still admitted


async def test_refuse_early_needs_room_for_one_sample_and_an_open_queue() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=0)
    q = make_queue(ex, clock, limit=2)
    q.refuse_early()
    q.submit(make_request(clock, 1.0))
    q.submit(make_request(clock, 1.0))
    with pytest.raises(Overloaded):
        q.refuse_early()
    q.close()
    with pytest.raises(ShuttingDown):
        q.refuse_early()


async def test_a_queued_request_no_batch_could_answer_in_time_is_never_computed() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock)
    q.submit(make_request(clock, 10.0))
    await asyncio.sleep(0)
    clock.advance(0.1)
    ex.finish()  # a batch takes 0.1 s
    q.submit(make_request(clock, 10.0))
    await asyncio.sleep(0)  # takes the slot
    doomed = make_request(clock, 0.25)
    q.submit(doomed)
    clock.advance(0.149)
    await asyncio.sleep(0)
    assert not doomed.future.done()
    clock.advance(0.011)  # 0.09 s left: less than a batch takes (0.1 s, 2% decayed by now)
    await asyncio.sleep(0)
    with pytest.raises(DeadlineExceeded, match="would pass before its batch finished"):
        await doomed.future
    ex.finish()
    await asyncio.sleep(0)
    assert all(doomed not in b.requests for b in ex.dispatched)


def test_a_backlog_of_long_requests_drains_by_its_tokens_not_its_count() -> None:
    # 20 samples queued at 100 tokens/s: as 20 short ones (one token each) they drain in
    # 0.2 s / 0.6 and a deadline 0.6 s away is met; as 20 of length 50 (1,000 tokens) they
    # take 10 s / 0.6, and the same request is refused with a Retry-After to match.
    short = snapshot(queued_samples=20, deadline_at=100.6)
    assert admit(short) is None
    long_ones = snapshot(queued_samples=20, queued_tokens=1000, deadline_at=100.6)
    shed = admit(long_ones)
    assert shed is not None and shed.reason == "deadline"
    assert shed.retry_after_s == pytest.approx(1000 / 0.6 / 100.0 + 1 / 0.6 / 100 + 0.05 - 0.6)


def test_a_long_request_adds_its_own_tokens_to_the_drain() -> None:
    # 10 tokens queued; the request itself is 1 sample of length 40: (10 + 40) / (0.6 * 100)
    # = 0.83 s plus a batch of 0.05 s, past a deadline 0.5 s away; at length 1 it is 0.23 s.
    assert admit(snapshot(queued_samples=10, deadline_at=100.5)) is None
    shed = admit(snapshot(queued_samples=10, length=40, deadline_at=100.5))
    assert shed is not None and shed.reason == "deadline"


@pytest.mark.parametrize("queued", [0, 1, 30, 63, 64])
@pytest.mark.parametrize("samples", [1, 8])
@pytest.mark.parametrize("deadline_at", [100.0001, 101.0, float("inf")])
@pytest.mark.parametrize("drain_rate", [0.0, 1.0, 1000.0])
def test_may_shed_is_false_only_where_admit_admits_without_asking(
    queued: int, samples: int, deadline_at: float, drain_rate: float
) -> None:
    """The queue skips the snapshot where may_shed says no: admit must agree, whatever the
    estimate says (a slow one here would shed anything it was asked about)."""
    s = snapshot(
        queued_samples=queued, samples=samples, deadline_at=deadline_at, drain_rate=drain_rate
    )
    if not may_shed(queued, samples, 64, deadline_at):
        assert admit(s) is None
    else:
        assert queued > 0 or queued + samples > 64
