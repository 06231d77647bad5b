"""A queue of a model with a dynamic dimension, against a fake clock and an executor that pads
as the workers do: which requests ride together, each answer cut back to its own length, the
oldest never overtaken past its delay bound, and the padding counted in /metrics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.batching.lengths import Lengths
from server.batching.pending import PendingRequest, RequestResult
from server.batching.queue import BatchQueue
from server.config import BatchingConfig
from server.errors import Overloaded
from server.executors.base import Batch, BatchDone
from server.metrics import Metrics
from server.models.spec import TensorSpec
from tests.fakes import FakeClock, FakeExecutor

# Per-token output (follows the length) and a pooled one (does not).
OUTPUTS = (TensorSpec("tokens", "float32", (-1,)), TensorSpec("total", "float32", (1,)))


class PaddingExecutor(FakeExecutor):
    """Pads each batch to its length with zeros; tokens = 2 * x, total = sum of x."""

    def finish(self, index: int = 0, fail: str | None = None) -> Batch:
        batch, done = self.running.pop(index)
        x = np.zeros((batch.samples, batch.length), np.float32)
        row = 0
        for r in batch.requests:
            x[row : row + r.samples, : r.length] = r.inputs["ids"]
            row += r.samples
        done(batch, BatchDone({"tokens": 2 * x, "total": x.sum(1, keepdims=True)}, 0.001, "f"))
        for listener in self.listeners:
            listener()
        return batch


def make_queue(
    executor: FakeExecutor, clock: FakeClock, metrics: Metrics, length_aware: bool = True
) -> BatchQueue:
    cfg = BatchingConfig(max_batch_size=4, max_delay_ms=5.0, max_queue_size=64, timeout_ms=1000.0)
    lengths = Lengths.of(OUTPUTS, length_aware)
    loop = asyncio.get_running_loop()
    return BatchQueue("enc", cfg, executor, clock, loop, metrics, lengths=lengths)


def request(clock: FakeClock, length: int, rows: int = 1, single: bool = False) -> PendingRequest:
    x = (length * 100 + np.arange(rows * length, dtype=np.float32)).reshape(rows, length)
    future: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
    return PendingRequest(
        {"ids": x}, rows, single, clock.now(), clock.now() + 1.0, future, length=length
    )


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_similar_lengths_ride_together_and_each_answer_has_its_own_length() -> None:
    clock, ex, metrics = FakeClock(), PaddingExecutor(), Metrics()
    q = make_queue(ex, clock, metrics)
    busy = request(clock, 3)
    q.submit(busy)  # takes the only slot, so the rest queue up
    await settle()
    waiting = [request(clock, n) for n in (10, 300, 12, 290, 11, 305, 9)]
    for r in waiting:
        q.submit(r)
    ex.finish()
    await settle()
    first = ex.dispatched[1]
    assert [r.length for r in first.requests] == [10, 12, 11, 9]  # the oldest, and its like
    assert first.length == 12
    ex.finish()
    await settle()
    assert sorted(r.length for r in ex.dispatched[2].requests) == [290, 300, 305]
    ex.finish()
    for r in [busy, *waiting]:
        result = await r.future
        x = r.inputs["ids"]
        np.testing.assert_array_equal(result.outputs["tokens"], 2 * x)  # trimmed to its own
        np.testing.assert_array_equal(result.outputs["total"], x.sum(1, keepdims=True))
    text = metrics.render().decode()
    requested = 3 + sum(r.length for r in waiting)
    assert f'microbatch_tokens_total{{kind="requested",model="enc"}} {requested}.0' in text
    computed = 3 + 4 * 12 + 3 * 305
    assert f'microbatch_tokens_total{{kind="computed",model="enc"}} {computed}.0' in text
    assert 'microbatch_batch_length_bucket{le="16",model="enc"} 2.0' in text


async def test_arrival_order_pads_to_the_longest_when_length_aware_is_off() -> None:
    clock, ex, metrics = FakeClock(), PaddingExecutor(), Metrics()
    q = make_queue(ex, clock, metrics, length_aware=False)
    q.submit(request(clock, 3))
    await settle()
    waiting = [request(clock, n) for n in (10, 300, 12, 290, 11)]
    for r in waiting:
        q.submit(r)
    ex.finish()
    await settle()
    assert [r.length for r in ex.dispatched[1].requests] == [10, 300, 12, 290]
    assert ex.dispatched[1].length == 300
    ex.finish()
    await settle()
    ex.finish()
    for r in waiting:
        np.testing.assert_array_equal((await r.future).outputs["tokens"], 2 * r.inputs["ids"])


async def test_a_single_sample_comes_back_without_the_batch_dimension_at_its_length() -> None:
    clock, ex = FakeClock(), PaddingExecutor()
    q = make_queue(ex, clock, Metrics())
    q.submit(request(clock, 3))
    await settle()
    lone, pair = request(clock, 5, single=True), request(clock, 7, rows=2)
    q.submit(lone)
    q.submit(pair)
    ex.finish()
    await settle()
    ex.finish()
    assert (await lone.future).outputs["tokens"].shape == (5,)
    assert (await pair.future).outputs["tokens"].shape == (2, 7)


async def test_the_oldest_rides_first_however_its_length_compares() -> None:
    """A long request among many short ones is never left behind: once it is the oldest, the
    next batch holds it (nothing starves)."""
    clock, ex = FakeClock(), PaddingExecutor()
    q = make_queue(ex, clock, Metrics())
    q.submit(request(clock, 3))
    await settle()
    long = request(clock, 400)
    q.submit(long)
    for _ in range(12):
        q.submit(request(clock, 8))
    ex.finish()
    await settle()
    assert long in ex.dispatched[1].requests


async def test_admission_reads_a_backlog_of_long_requests_by_its_tokens() -> None:
    """The drain rate is in tokens: after a batch of 10 tokens took 10 ms (1,000 tokens/s),
    four queued requests of 100 tokens are known to take far longer than four of 1 token,
    and a request with 300 ms left is refused behind the first and admitted behind the second
    (counted in samples, both backlogs would have looked alike: 4 samples at 100/s)."""
    for queued_length, admitted in ((1, True), (100, False)):
        clock, ex = FakeClock(), PaddingExecutor()
        q = make_queue(ex, clock, Metrics())
        q.submit(request(clock, 10))
        await settle()
        clock.advance(0.010)
        ex.finish()  # 10 tokens in 10 ms of busy time
        await settle()
        q.submit(request(clock, 10))  # computing: the backlog's head
        await settle()
        for _ in range(4):
            q.submit(request(clock, queued_length))
        future: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
        late = PendingRequest(
            {"ids": np.zeros((1, 10), np.float32)},
            1,
            False,
            clock.now(),
            clock.now() + 0.3,
            future,
            length=10,
        )
        if admitted:
            q.submit(late)
        else:
            with pytest.raises(Overloaded, match="past this request's deadline"):
                q.submit(late)
        assert q.outstanding_samples == 5 + admitted
