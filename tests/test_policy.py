"""The pure release rule, tested with numbers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.batching.policy import QueueSnapshot, decide


def snap(**kw: object) -> QueueSnapshot:
    base: dict[str, object] = dict(
        now=10.0,
        queued_samples=3,
        oldest_arrival_at=10.0,
        free_slots=1,
        max_batch_size=8,
        max_delay_s=0.005,
        hold_for_fill=False,
    )
    base.update(kw)
    return QueueSnapshot(**base)  # type: ignore[arg-type]


def test_empty_queue_holds() -> None:
    assert not decide(snap(queued_samples=0, oldest_arrival_at=None)).release


def test_no_free_slot_holds_without_a_timer() -> None:
    d = decide(snap(free_slots=0, queued_samples=100))
    assert not d.release and d.wake_at is None


def test_idle_cpu_executor_releases_a_lone_request_at_once() -> None:
    assert decide(snap(queued_samples=1)).release


def test_full_batch_releases_even_when_holding_for_fill() -> None:
    assert decide(snap(queued_samples=8, hold_for_fill=True)).release


def test_holding_for_fill_waits_until_oldest_plus_max_delay() -> None:
    d = decide(snap(now=10.0049, oldest_arrival_at=10.0, hold_for_fill=True))
    assert not d.release and d.wake_at == 10.005
    assert decide(snap(now=10.005, oldest_arrival_at=10.0, hold_for_fill=True)).release


@given(
    now=st.floats(0, 100),
    age=st.floats(0, 1),
    queued=st.integers(1, 100),
    slots=st.integers(0, 4),
    cap=st.integers(1, 64),
    delay=st.floats(0, 0.1),
    hold=st.booleans(),
)
def test_never_holds_past_the_deadline_with_a_free_slot(
    now: float, age: float, queued: int, slots: int, cap: int, delay: float, hold: bool
) -> None:
    d = decide(
        snap(
            now=now,
            oldest_arrival_at=now - age,
            queued_samples=queued,
            free_slots=slots,
            max_batch_size=cap,
            max_delay_s=delay,
            hold_for_fill=hold,
        )
    )
    # The flush time as the policy computes it, in floats: `age >= delay` can disagree with it
    # by one rounding (age 0, delay 2.2e-16 at now = 2.0).
    flush_at = (now - age) + delay
    if slots == 0:
        assert not d.release
    elif now >= flush_at or queued >= cap or not hold:
        assert d.release
    else:
        assert d.wake_at is not None and d.wake_at <= now - age + delay + 1e-9
