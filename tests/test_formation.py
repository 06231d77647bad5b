"""Length-aware batch formation, with numbers: the oldest always rides, batches never exceed
max_batch_size, padding is never a larger share than in the arrival-order batch, similar
lengths ride together, and nothing starves (Hypothesis over random queues)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from server.batching.formation import (
    Waiting,
    arrival_order,
    by_length,
    efficiency,
    window,
)


def queue(*items: tuple[int, int]) -> list[Waiting]:
    return [Waiting(samples, length) for samples, length in items]


def test_arrival_order_takes_the_oldest_that_fit() -> None:
    fifo = arrival_order(queue((2, 10), (3, 500), (2, 20), (1, 30)), max_batch=5)
    assert fifo.picked == (0, 1) and fifo.samples == 5 and fifo.length == 500
    assert fifo.tokens == 2 * 10 + 3 * 500
    assert fifo.waste == 1.0 - 1520 / 2500


def test_short_requests_ride_together_and_the_long_ones_wait_their_turn() -> None:
    # The oldest is short; one long request arrived among many short ones.
    waiting = queue((1, 12), (1, 500), *[(1, 10 + i % 5) for i in range(40)])
    choice = by_length(waiting, max_batch=8)
    assert 0 in choice.picked and 1 not in choice.picked
    assert choice.samples == 8 and choice.length <= 14
    assert choice.waste < 0.2 < arrival_order(waiting, 8).waste


def test_a_long_oldest_takes_the_longest_others_with_it() -> None:
    waiting = queue((1, 400), *[(1, 8)] * 20, *[(1, 380 + i) for i in range(10)])
    choice = by_length(waiting, max_batch=8)
    picked_lengths = sorted(waiting[i].length for i in choice.picked)
    assert picked_lengths[0] >= 380 and choice.samples == 8 and choice.length == 400


def test_equal_lengths_form_the_arrival_order_batch() -> None:
    waiting = queue(*[(1, 64)] * 20)
    assert by_length(waiting, max_batch=8) == arrival_order(waiting, 8)


def test_a_short_oldest_rides_with_the_short_ones_not_padded_to_the_long_ones() -> None:
    # Tokens per cost would pad the oldest (10) to 305 beside the three longest; efficiency
    # keeps the short ones together and leaves the long ones a batch of their own.
    waiting = queue((1, 10), (1, 300), (1, 12), (1, 290), (1, 11), (1, 305), (1, 9))
    choice = by_length(waiting, max_batch=4)
    assert sorted(waiting[i].length for i in choice.picked) == [9, 10, 11, 12]


def test_a_long_oldest_among_short_ones_rides_alone_rather_than_pad_them() -> None:
    waiting = queue((1, 500), *[(1, 10)] * 20)
    assert by_length(waiting, max_batch=8).picked == (0,)
    assert arrival_order(waiting, 8).samples == 8  # which would pad seven to 500


def test_a_request_that_fills_the_batch_alone_rides_alone() -> None:
    waiting = queue((8, 30), (1, 30), (1, 31))
    assert by_length(waiting, max_batch=8).picked == (0,)


def test_a_measured_cost_with_a_large_fixed_part_prefers_full_batches() -> None:
    # A fixed cost of 10 ms and 1 us per token: a batch of 8 short requests beats the oldest
    # alone even where padding it to the next length costs something.
    def cost(n: np.ndarray, length: np.ndarray) -> np.ndarray:
        return np.asarray(0.010 + 1e-6 * n * length, dtype=np.float64)

    waiting = queue((1, 10), *[(1, 20)] * 7, (1, 200))
    choice = by_length(waiting, max_batch=8, cost=cost)
    assert choice.samples == 8 and choice.length == 20


requests = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 512)), min_size=1, max_size=80).map(
    lambda items: queue(*items)
)


@settings(max_examples=300, deadline=None)
@given(waiting=requests, max_batch=st.integers(4, 32))
def test_the_choice_is_valid_and_never_wastes_more_than_arrival_order(
    waiting: list[Waiting], max_batch: int
) -> None:
    waiting = [w if w.samples <= max_batch else Waiting(max_batch, w.length) for w in waiting]
    choice = by_length(waiting, max_batch)
    fifo = arrival_order(waiting, max_batch)
    assert choice.picked[0] == 0  # the oldest always rides
    assert list(choice.picked) == sorted(set(choice.picked))
    assert 0 < choice.samples <= max_batch
    assert choice.samples == sum(waiting[i].samples for i in choice.picked)
    assert choice.length == max(waiting[i].length for i in choice.picked)
    assert choice.waste <= fifo.waste + 1e-9
    # and is at least as efficient (what the requests would cost alone over what it costs)
    assert efficiency(waiting, choice, max_batch) >= efficiency(waiting, fifo, max_batch) - 1e-12


@settings(max_examples=100, deadline=None)
@given(waiting=requests, max_batch=st.integers(4, 32))
def test_nothing_starves_each_request_rides_within_as_many_batches_as_are_older(
    waiting: list[Waiting], max_batch: int
) -> None:
    waiting = [w if w.samples <= max_batch else Waiting(max_batch, w.length) for w in waiting]
    left = list(range(len(waiting)))  # original indices still queued, in arrival order
    rode_in: dict[int, int] = {}
    batch = 0
    while left:
        snapshot = [waiting[i] for i in left[: window(max_batch)]]
        choice = by_length(snapshot, max_batch)
        for position in choice.picked:
            rode_in[left[position]] = batch
        left = [i for p, i in enumerate(left) if p not in set(choice.picked)]
        batch += 1
    assert all(rode_in[i] <= i for i in rode_in)  # at most one batch per request ahead of it
