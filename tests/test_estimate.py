"""The batch-time estimate describes the model, not the accident: numbers for BatchTime, and
Hypothesis properties over the real BatchQueue with a fake clock and a fake executor: after any
sequence of stalls, restarts and idle gaps, a lone request with a deadline of 10x the
calibrated batch-1 time on an idle model is admitted and answered."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.batching.estimate import CLAMP, HALF_LIFE_S, IDLE_MARGIN, BatchTime
from server.batching.pending import PendingRequest, RequestResult
from server.batching.queue import BatchQueue
from server.config import BatchingConfig
from server.errors import DeadlineExceeded, Overloaded
from server.metrics import Metrics
from tests.fakes import FakeClock, FakeExecutor


def calibrated(samples: int, length: int = 1) -> float:
    """A model whose batch costs 1 ms plus 0.1 ms per sample (per token, at a length)."""
    return 0.001 + 0.0001 * samples * length


def test_batch_time_is_unknown_until_measured_without_a_calibration() -> None:
    est = BatchTime()
    assert est.batch_s(0.0, 8) == 0.0 and est.rate(0.0) == 0.0
    est.record(now=10.0, dispatched_at=9.9, samples=8)  # 8 in 0.1 s
    assert est.batch_s(10.0, 8) == pytest.approx(0.1) and est.rate(10.0) == pytest.approx(80.0)


def test_drain_rate_is_in_tokens_where_samples_have_lengths() -> None:
    est = BatchTime()
    est.record(now=10.0, dispatched_at=9.9, samples=8, length=50, tokens=300)  # 8 of 10-50
    assert est.rate(10.0) == pytest.approx(3000.0)  # tokens asked for, not positions padded


def test_drain_rate_counts_busy_time_only() -> None:
    est = BatchTime()
    est.record(now=10.0, dispatched_at=9.9, samples=8)
    est.record(now=12.0, dispatched_at=11.9, samples=8)  # 2 s idle in between: left out
    assert est.rate(12.0) == pytest.approx(80.0)
    est.record(now=12.05, dispatched_at=11.95, samples=8)  # pipelined: since the last answer
    assert est.rate(12.05) == pytest.approx(0.8 * 80.0 + 0.2 * 160.0)


def test_with_a_calibration_the_estimate_starts_there_and_follows_observations() -> None:
    est = BatchTime(calibrated)
    assert est.batch_s(0.0, 10) == pytest.approx(0.002)
    for i in range(30):  # the machine runs everything twice as slow as calibrated
        est.record(now=1.0 + i * 0.01, dispatched_at=1.0 + i * 0.01 - 0.004, samples=10)
    assert est.batch_s(1.29, 10) == pytest.approx(0.004, rel=0.01)
    assert est.batch_s(1.29, 30) == pytest.approx(0.008, rel=0.01)  # the same factor, bigger


def test_one_stall_raises_the_estimate_by_a_bounded_factor() -> None:
    est = BatchTime(calibrated)
    est.record(now=100.0, dispatched_at=95.0, samples=1)  # 5 s for a 1.1 ms batch: a SIGSTOP
    bound = 1.0 - 0.2 + 0.2 * CLAMP  # the moving average takes one clamped observation
    assert est.batch_s(100.0, 1) == pytest.approx(bound * calibrated(1))


def test_a_retried_batch_is_no_evidence_but_ends_the_busy_period() -> None:
    est = BatchTime()
    est.record(now=10.0, dispatched_at=9.9, samples=8)
    est.record(now=13.0, dispatched_at=10.0, samples=8, clean=False)  # spans a respawn
    assert est.batch_s(13.0, 8) == pytest.approx(0.1 * 0.5 ** (3.0 / HALF_LIFE_S))
    est.record(now=13.1, dispatched_at=12.5, samples=8)  # busy only since the last answer
    assert est.rate(13.1) == pytest.approx(80.0)  # 8 in the 0.1 s since 13.0, not since 12.5


def test_old_evidence_decays_back_to_the_calibration_or_to_nothing() -> None:
    with_prior, without = BatchTime(calibrated), BatchTime()
    for est in (with_prior, without):
        for i in range(20):  # ten times the calibrated cost, for a while
            est.record(now=1.0 + i, dispatched_at=1.0 + i - 0.011, samples=1)
    later = 20.0 + 4 * HALF_LIFE_S
    assert with_prior.batch_s(later, 1) < 1.6 * calibrated(1)
    assert without.batch_s(later, 1) < 0.011 / 10
    assert without.rate(later) == 0.0  # stale: admission goes back to the queue limit alone


def test_an_idle_model_never_expects_more_than_a_margin_over_its_calibration() -> None:
    est = BatchTime(calibrated)
    for i in range(20):
        est.record(now=1.0 + i * 0.1, dispatched_at=1.0 + i * 0.1 - 0.05, samples=1)
    now = 3.0
    assert est.batch_s(now, 1) > 10 * calibrated(1)
    assert est.batch_s(now, 1, idle=True) == pytest.approx(IDLE_MARGIN * calibrated(1))


# The queue, with a fake clock and executor -----------------------------------------------------
def make_queue(ex: FakeExecutor, clock: FakeClock, calibration: bool = True) -> BatchQueue:
    cfg = BatchingConfig(max_batch_size=8, max_delay_ms=5.0, max_queue_size=64, timeout_ms=1e3)
    prior = calibrated if calibration else None
    return BatchQueue("m", cfg, ex, clock, asyncio.get_running_loop(), Metrics(), calibrated=prior)


def make_request(clock: FakeClock, timeout_s: float, value: float = 1.0) -> PendingRequest:
    future: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
    x = np.full((1, 1), value, np.float32)
    return PendingRequest({"input": x}, 1, False, clock.now(), clock.now() + timeout_s, future)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def finish_all(ex: FakeExecutor, clock: FakeClock, took_s: float) -> None:
    while ex.running:
        clock.advance(took_s)
        ex.finish()
        await settle()


# One step of a history: (kind, seconds, requests). Kinds: a batch that takes `seconds`; a stall
# (a batch stopped for `seconds`); a restart (the batch's worker dies, and the batch runs again
# after `seconds` on a new one); an idle gap; requests with a deadline too tight to meet.
Step = tuple[str, float, int]
steps = st.lists(
    st.tuples(
        st.sampled_from(["batch", "stall", "restart", "idle", "tight"]),
        st.floats(0.0005, 30.0),
        st.integers(1, 12),
    ),
    max_size=12,
)


async def play(q: BatchQueue, ex: FakeExecutor, clock: FakeClock, history: list[Step]) -> None:
    for kind, seconds, count in history:
        if kind == "idle":
            clock.advance(seconds)
            continue
        timeout_s = calibrated(1) if kind == "tight" else 3600.0
        sent = [make_request(clock, timeout_s) for _ in range(count)]
        for request in sent:
            with contextlib.suppress(Overloaded):  # a full queue: that is part of the history
                q.submit(request)
        await settle()
        if kind == "restart" and ex.running:
            clock.advance(seconds)
            ex.running[0][0].attempts += 1  # the pool's retry on a new worker
        await finish_all(ex, clock, seconds if kind in ("batch", "stall") else calibrated(8))
        for request in sent:  # a 504 is part of the history too: read, as a handler reads it
            if request.future.done():
                request.future.exception()


@settings(max_examples=150, deadline=None)
@given(history=steps, calibration=st.booleans())
async def test_after_any_stalls_restarts_and_gaps_a_lone_request_on_an_idle_model_is_answered(
    history: list[Step], calibration: bool
) -> None:
    """With a calibration, and without one (it failed its check: the queue knows only what it
    measured), for a model that really costs `calibrated`."""
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock, calibration)
    await play(q, ex, clock, history)
    assert not ex.running and q.outstanding_samples == 0  # idle, with its worker free
    lone = make_request(clock, 10 * calibrated(1), value=7.0)
    q.submit(lone)  # admitted: no Overloaded
    await settle()
    assert ex.running and ex.running[0][0].requests == [lone]
    clock.advance(calibrated(1))
    ex.finish()
    assert (await lone.future).outputs["output"].tolist() == [[14.0]]


async def test_a_request_whose_batch_is_stuck_gets_504_at_its_deadline() -> None:
    clock, ex = FakeClock(), FakeExecutor(slots=1)
    q = make_queue(ex, clock)
    stuck, patient = make_request(clock, 0.5), make_request(clock, 60.0)
    q.submit(stuck)
    q.submit(patient)
    await settle()
    assert ex.running  # both in one batch, which the worker never answers
    clock.advance(0.499)
    await settle()
    assert not stuck.future.done()
    clock.advance(0.002)
    await settle()
    with pytest.raises(DeadlineExceeded, match="while its batch of model 'm' was running"):
        await stuck.future
    assert not patient.future.done()
    clock.advance(4.0)
    ex.finish()  # the late answer: dropped for the one already answered, kept for the other
    assert (await patient.future).batch_size == 2
    assert q.outstanding_samples == 0
