"""Poisoned batches: the pure splitting rule, and the queue re-running the halves of a batch
the model raised on, so that only the culprits fail and every other request gets its own rows,
exactly once. Fake clock and fake executor; no sleeps."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.batching.bisection import halves, should_bisect
from server.batching.pending import PendingRequest, RequestResult
from server.batching.queue import BatchQueue
from server.config import BatchingConfig
from server.errors import DeadlineExceeded, ModelError, ShuttingDown
from server.executors.base import Batch, BatchDone, BatchFailed
from server.metrics import Metrics
from tests.fakes import FakeClock, FakeExecutor


class PoisonExecutor(FakeExecutor):
    """output = 2 * input, except that a batch holding any negative value fails as a model
    raising would (model_raised), like tests/fault_models.Work."""

    def finish_one(self, index: int = 0) -> Batch:
        batch, done = self.running.pop(index)
        x = np.concatenate([r.inputs["input"] for r in batch.requests])
        if (x < 0).any():
            done(
                batch,
                BatchFailed("model_error", "negative input", model_raised=True, device="fake"),
            )
        else:
            done(batch, BatchDone({"output": x * 2}, 0.001, "fake"))
        for listener in self.listeners:
            listener()
        return batch


def make_queue(
    executor: FakeExecutor, clock: FakeClock, metrics: Metrics | None = None
) -> BatchQueue:
    cfg = BatchingConfig(max_batch_size=8, max_delay_ms=5.0, max_queue_size=10_000, timeout_ms=1e3)
    return BatchQueue("m", cfg, executor, clock, asyncio.get_running_loop(), metrics or Metrics())


def make_request(
    clock: FakeClock, rows: int, start: float, timeout_s: float = 1.0
) -> PendingRequest:
    x = (start + np.arange(rows, dtype=np.float32)).reshape(rows, 1)
    future: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
    return PendingRequest({"input": x}, rows, False, clock.now(), clock.now() + timeout_s, future)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def run_all(ex: PoisonExecutor, limit: int = 1000) -> None:
    for _ in range(limit):
        await settle()
        if not ex.running:
            return
        ex.finish_one()
    raise AssertionError("batches kept coming")


# --- the pure rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "cut"),
    [
        ([1, 1], 1),
        ([1, 1, 1, 1], 2),
        ([1, 1, 1], 1),
        ([6, 1, 1], 1),
        ([1, 1, 6], 2),
        ([3, 3, 2], 1),
    ],
)
def test_halves_are_in_order_non_empty_and_even_in_samples(sizes: list[int], cut: int) -> None:
    items = list(range(len(sizes)))
    assert halves(items, sizes) == (items[:cut], items[cut:])


@given(st.lists(st.integers(1, 32), min_size=2, max_size=64))
def test_halves_partition_the_batch(sizes: list[int]) -> None:
    items = list(range(len(sizes)))
    first, second = halves(items, sizes)
    assert first and second and first + second == items


def test_a_lone_request_cannot_be_halved() -> None:
    with pytest.raises(ValueError):
        halves(["only"], [3])


def test_only_the_models_own_failures_on_several_requests_are_bisected() -> None:
    assert should_bisect("model_error", True, 2)
    assert not should_bisect("model_error", True, 1)  # the culprit itself
    assert not should_bisect("model_error", False, 8)  # e.g. a worker that died twice
    assert not should_bisect("shutting_down", True, 8)
    assert not should_bisect("internal", True, 8)


# --- the queue -------------------------------------------------------------------------------


async def test_poisoned_request_fails_alone_and_its_batch_mates_get_their_rows() -> None:
    clock, ex, metrics = FakeClock(), PoisonExecutor(slots=1), Metrics()
    q = make_queue(ex, clock, metrics)
    q.submit(make_request(clock, 1, start=0.0))  # occupies the only slot
    await settle()
    group = [make_request(clock, 1, start=10.0 * i + 1) for i in range(6)]
    group[4].inputs["input"] = -group[4].inputs["input"]
    for r in group:
        q.submit(r)
    await run_all(ex)
    for i, r in enumerate(group):
        if i == 4:
            with pytest.raises(ModelError, match="negative"):
                await r.future
        else:
            np.testing.assert_array_equal((await r.future).outputs["output"], 2 * r.inputs["input"])
    # [6] fails -> [3 | 3]: [0..2] passes, [3..5] fails -> [3 | 4, 5] -> [4 | 5]: 4 fails alone.
    assert [len(b.requests) for b in ex.dispatched] == [1, 6, 3, 3, 1, 2, 1, 1]
    assert q.outstanding_samples == 0
    assert 'microbatch_batches_total{device="fake",model="m",outcome="failed"} 4.0' in (
        metrics.render().decode()
    )


async def test_a_failure_not_of_the_models_making_fails_the_whole_batch_once() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock)
    q.submit(make_request(clock, 1, start=0.0))
    await settle()
    group = [make_request(clock, 1, start=i) for i in range(4)]
    for r in group:
        q.submit(r)
    ex.finish()
    await settle()
    batch, done = ex.running.pop()
    done(batch, BatchFailed("model_error", "the worker died, and again on retry"))
    for r in group:
        with pytest.raises(ModelError, match="again on retry"):
            await r.future
    assert len(ex.dispatched) == 2 and q.outstanding_samples == 0


async def test_halves_run_before_anything_queued_later() -> None:
    clock, ex = FakeClock(), PoisonExecutor(slots=1)
    q = make_queue(ex, clock)
    first = [make_request(clock, 1, start=-1.0), make_request(clock, 1, start=5.0)]
    for r in first:
        q.submit(r)
    await settle()
    later = make_request(clock, 1, start=7.0)
    q.submit(later)
    ex.finish_one()  # fails: halves go ahead of `later`
    await settle()
    assert ex.running[0][0].requests == [first[0]]
    await run_all(ex)
    assert ex.dispatched[-1].requests == [later]
    assert isinstance(first[0].future.exception(), ModelError)


async def test_a_drain_waits_for_the_halves() -> None:
    clock, ex = FakeClock(), PoisonExecutor(slots=1)
    q = make_queue(ex, clock)
    group = [make_request(clock, 1, start=-1.0), make_request(clock, 1, start=5.0)]
    for r in group:
        q.submit(r)
    await settle()
    q.close()
    idle = asyncio.ensure_future(q.wait_idle())
    ex.finish_one()
    await settle()
    assert not idle.done() and q.outstanding_samples == 2
    await run_all(ex)
    await asyncio.wait_for(idle, 1)
    assert (await group[1].future).batch_size == 1
    assert isinstance(group[0].future.exception(), ModelError)


async def test_halves_whose_deadline_passed_or_client_left_are_never_run() -> None:
    clock, ex, metrics = FakeClock(), PoisonExecutor(slots=1), Metrics()
    q = make_queue(ex, clock, metrics)
    late = make_request(clock, 1, start=1.0, timeout_s=0.010)
    gone = make_request(clock, 1, start=2.0)
    bad = make_request(clock, 1, start=-3.0)
    for r in (late, gone, bad):
        q.submit(r)
    await settle()
    clock.advance(0.020)
    gone.future.cancel()
    ex.finish_one()  # fails; of the halves only `bad` is still worth running
    await run_all(ex)
    with pytest.raises(DeadlineExceeded):
        await late.future
    with pytest.raises(ModelError):
        await bad.future
    assert [b.requests for b in ex.dispatched[1:]] == [[bad]]
    text = metrics.render().decode()
    # `late` got its 504 at its deadline while the batch ran, and was not run again.
    assert 'reason="deadline_running"} 1.0' in text and 'reason="client_gone"} 1.0' in text
    assert q.outstanding_samples == 0


async def test_abort_answers_everything_not_in_an_executor() -> None:
    clock, ex = FakeClock(), PoisonExecutor(slots=1)
    q = make_queue(ex, clock)
    pair = [make_request(clock, 1, start=-1.0), make_request(clock, 1, start=5.0)]
    for r in pair:
        q.submit(r)
    await settle()
    queued = make_request(clock, 1, start=9.0)
    q.submit(queued)
    ex.finish_one()  # fails: the first half takes the slot, the second waits with `queued`
    await settle()
    assert ex.running[0][0].requests == [pair[0]]
    q.abort(ShuttingDown("drain timed out"))
    for r in (pair[1], queued):
        with pytest.raises(ShuttingDown):
            await r.future
    assert not pair[0].future.done()  # the executor answers its own batch when it stops
    ex.finish_one()
    with pytest.raises(ModelError):
        await pair[0].future
    assert q.outstanding_samples == 0
    with pytest.raises(ShuttingDown):
        q.submit(make_request(clock, 1, start=0.0))


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=30),
    poisoned=st.sets(st.integers(0, 29)),
    cancelled=st.sets(st.integers(0, 29)),
    slots=st.integers(1, 3),
)
def test_every_request_is_answered_once_with_its_own_rows_or_its_own_failure(
    sizes: list[int], poisoned: set[int], cancelled: set[int], slots: int
) -> None:
    async def scenario() -> None:
        clock, ex = FakeClock(), PoisonExecutor(slots=slots)
        q = make_queue(ex, clock)
        requests = []
        for i, rows in enumerate(sizes):
            r = make_request(clock, rows, start=100.0 * i + 1)
            if i in poisoned:
                r.inputs["input"] = -r.inputs["input"]
            requests.append(r)
            q.submit(r)
            if i in cancelled:
                r.future.cancel()
            if i % 4 == 0:
                await settle()
        await run_all(ex)
        assert all(b.samples <= 8 for b in ex.dispatched)
        assert q.outstanding_samples == 0
        for i, r in enumerate(requests):
            assert r.future.done()
            if r.future.cancelled():
                continue
            if i in poisoned:
                assert isinstance(r.future.exception(), ModelError)
            else:
                expected = 2 * r.inputs["input"]
                np.testing.assert_array_equal(r.future.result().outputs["output"], expected)
            # One request is in at most one batch per level of halving.
            runs = sum(r in b.requests for b in ex.dispatched)
            assert runs <= 1 + len(sizes).bit_length()

    asyncio.run(scenario())
