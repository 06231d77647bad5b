"""The per-model batch queue against a fake clock and a fake executor: deadlines, fill, queue
limit, expiry, fairness, and each request answered exactly once with its own rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.batching.pending import PendingRequest, RequestResult
from server.batching.queue import BatchQueue
from server.config import BatchingConfig
from server.errors import DeadlineExceeded, ModelError, Overloaded, ShuttingDown
from server.metrics import Metrics
from tests.fakes import FakeClock, FakeExecutor


def make_queue(executor: FakeExecutor, clock: FakeClock, **settings: float) -> BatchQueue:
    cfg = BatchingConfig(
        **{
            "max_batch_size": 8,
            "max_delay_ms": 5.0,
            "max_queue_size": 64,
            "timeout_ms": 1000.0,
            **settings,
        }
    )  # type: ignore[arg-type]
    return BatchQueue("m", cfg, executor, clock, asyncio.get_running_loop(), Metrics())


def make_request(
    clock: FakeClock, rows: int, start: float = 0.0, timeout_s: float = 1.0, single: bool = False
) -> PendingRequest:
    x = (start + np.arange(rows, dtype=np.float32)).reshape(rows, 1)
    future: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
    return PendingRequest({"input": x}, rows, single, clock.now(), clock.now() + timeout_s, future)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_lone_request_is_dispatched_at_once_when_the_executor_is_idle() -> None:
    clock, ex = FakeClock(), FakeExecutor()
    q = make_queue(ex, clock, max_delay_ms=50)
    r = make_request(clock, 1)
    q.submit(r)
    await settle()
    assert len(ex.dispatched) == 1  # no clock advance: nothing waited for max_delay
    ex.finish()
    assert (await r.future).outputs["output"].tolist() == [[0.0]]


async def test_requests_arriving_together_ride_in_one_batch() -> None:
    clock, ex = FakeClock(), FakeExecutor()
    q = make_queue(ex, clock)
    requests = [make_request(clock, 1, start=i) for i in range(5)]
    for r in requests:
        q.submit(r)
    await settle()
    assert [b.samples for b in ex.dispatched] == [5]


async def test_busy_executor_accumulates_then_dispatches_full_batches() -> None:
    clock, ex = FakeClock(), FakeExecutor()
    q = make_queue(ex, clock)
    q.submit(make_request(clock, 1))
    await settle()
    for i in range(20):
        q.submit(make_request(clock, 1, start=i))
    await settle()
    assert len(ex.dispatched) == 1
    ex.finish()
    await settle()
    ex.finish()
    await settle()
    assert [b.samples for b in ex.dispatched] == [1, 8, 8]


async def test_hold_for_fill_releases_at_oldest_plus_max_delay() -> None:
    clock, ex = FakeClock(), FakeExecutor(hold=True)
    q = make_queue(ex, clock, max_delay_ms=5)
    for i in range(3):
        q.submit(make_request(clock, 2, start=i))
    await settle()
    assert ex.dispatched == []
    clock.advance(0.0049)
    await settle()
    assert ex.dispatched == []
    clock.advance(0.0001)
    await settle()
    assert [b.samples for b in ex.dispatched] == [6]


async def test_hold_for_fill_releases_a_full_batch_without_waiting() -> None:
    clock, ex = FakeClock(), FakeExecutor(hold=True)
    q = make_queue(ex, clock)
    for i in range(9):
        q.submit(make_request(clock, 1, start=i))
    await settle()
    assert [b.samples for b in ex.dispatched] == [8]


async def test_queue_limit_answers_503_with_retry_after() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=0)
    q = make_queue(ex, clock, max_queue_size=10)
    q.submit(make_request(clock, 6))
    with pytest.raises(Overloaded) as info:
        q.submit(make_request(clock, 5))
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    q.submit(make_request(clock, 4))  # exactly at the limit is fine
    assert q.queued_samples == 10


async def test_expired_requests_get_504_and_are_never_computed() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock)
    q.submit(make_request(clock, 1))
    await settle()  # occupies the only slot
    late = make_request(clock, 1, timeout_s=0.010)
    ok = make_request(clock, 1, timeout_s=5.0)
    q.submit(late)
    q.submit(ok)
    clock.advance(0.011)  # the deadline timer fires with the executor still busy
    await settle()
    with pytest.raises(DeadlineExceeded, match="not computed"):
        await late.future
    ex.finish()
    await settle()
    assert [r for b in ex.dispatched for r in b.requests].count(late) == 0
    assert ok in ex.dispatched[-1].requests


async def test_cancelled_requests_are_dropped_before_dispatch() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock)
    q.submit(make_request(clock, 1))
    await settle()
    gone, kept = make_request(clock, 1), make_request(clock, 1)
    q.submit(gone)
    q.submit(kept)
    gone.future.cancel()
    ex.finish()
    await settle()
    assert ex.dispatched[-1].requests == [kept]


async def test_failed_batch_fails_each_of_its_requests_and_nothing_else() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock)
    a, b = make_request(clock, 1), make_request(clock, 1)
    q.submit(a)
    await settle()
    q.submit(b)
    ex.finish(fail="boom")
    with pytest.raises(ModelError, match="boom"):
        await a.future
    await settle()
    ex.finish()
    assert (await b.future).batch_size == 1


async def test_closed_queue_refuses_new_requests_and_finishes_admitted_ones() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock)
    admitted = make_request(clock, 2)
    q.submit(admitted)
    q.close()
    with pytest.raises(ShuttingDown):
        q.submit(make_request(clock, 1))
    await settle()
    ex.finish()
    await asyncio.wait_for(q.wait_idle(), 1)
    assert (await admitted.future).outputs["output"].shape == (2, 1)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=40),
    slots=st.integers(1, 3),
    cancel=st.sets(st.integers(0, 39)),
)
def test_every_request_is_answered_exactly_once_with_its_own_rows(
    sizes: list[int], slots: int, cancel: set[int]
) -> None:
    async def scenario() -> None:
        clock, ex = FakeClock(), FakeExecutor(slots=slots)
        q = make_queue(ex, clock, max_queue_size=10_000)
        requests = []
        for i, rows in enumerate(sizes):
            r = make_request(clock, rows, start=100.0 * i)
            requests.append(r)
            q.submit(r)
            if i in cancel:
                r.future.cancel()
            if i % 3 == 0:
                await settle()
        for _ in range(200):
            await settle()
            if not ex.running:
                break
            ex.finish(0)
        assert all(b.samples <= 8 for b in ex.dispatched)
        seen = [r for b in ex.dispatched for r in b.requests]
        assert len(seen) == len(set(map(id, seen)))  # nobody computed twice
        for i, r in enumerate(requests):
            if i in cancel:
                assert r not in seen
                continue
            got = (await r.future).outputs["output"]
            expected = 2 * (100.0 * i + np.arange(sizes[i], dtype=np.float32)).reshape(-1, 1)
            np.testing.assert_array_equal(got, expected)

    asyncio.run(scenario())
