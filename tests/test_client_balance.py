"""Client-side balancing with numbers: the choice of endpoint (power of two choices on
outstanding requests), skips that expire and double, when a retry may go elsewhere at once; and
the endpoint list's mechanism with a fake clock and a resolver that needs no DNS server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

import client
from client.balance import Candidate, Outcome, SkipPolicy, choose, has_spare, skipped_until
from client.endpoints import Endpoints
from client.retry import RetryPolicy, retry_delay_s
from client.transport import Address

GRID = [i / 60 for i in range(60)]  # uniform draws, evenly spread over [0, 1)


def free(*outstanding: int) -> list[Candidate]:
    return [Candidate(n, 0.0, False) for n in outstanding]


def test_of_the_two_drawn_the_one_with_fewer_outstanding_wins() -> None:
    candidates = free(5, 0, 9)
    assert choose(candidates, 0.0, 0.0, 0.0) == 1  # draws 0 and 1: 5 against 0
    assert choose(candidates, 0.0, 0.99, 0.0) == 0  # draws 2 and 0: 9 against 5
    assert choose(candidates, 0.0, 0.99, 0.99) == 1  # draws 2 and 1: 9 against 0


def test_a_tie_goes_to_the_first_drawn() -> None:
    assert choose(free(3, 3), 0.0, 0.0, 0.5) == 0
    assert choose(free(3, 3), 0.0, 0.7, 0.5) == 1


def test_every_pair_is_drawn_equally_often_and_never_one_endpoint_twice() -> None:
    n = 4
    pairs: Counter[frozenset[int]] = Counter()
    for first, second in itertools.product(GRID, GRID):
        i = min(int(first * n), n - 1)
        j = min(int(second * (n - 1)), n - 2)
        j += j >= i
        assert i != j
        pairs[frozenset((i, j))] += 1
    assert len(pairs) == 6 and len(set(pairs.values())) == 1


def test_with_equal_loads_the_choice_spreads_evenly() -> None:
    picks = Counter(choose(free(2, 2, 2), 0.0, a, b) for a, b in itertools.product(GRID, GRID))
    assert picks == {0: 1200, 1: 1200, 2: 1200}


def test_a_busier_endpoint_is_chosen_less_and_the_busiest_never() -> None:
    # Three endpoints with 0, 4 and 8 outstanding: each wins exactly the pairs it is the
    # lighter of, and a pair is drawn 1/3 of the time.
    picks = Counter(choose(free(0, 4, 8), 0.0, a, b) for a, b in itertools.product(GRID, GRID))
    assert picks == {0: 2400, 1: 1200}


@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.sampled_from([0.0, 5.0, 20.0]), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    st.floats(0, 0.999999),
    st.floats(0, 0.999999),
)
def test_properties_of_the_choice(
    rows: list[tuple[int, float, bool]], first: float, second: float
) -> None:
    now = 10.0
    candidates = [Candidate(n, until, tried) for n, until, tried in rows]
    index = choose(candidates, now, first, second)
    chosen = candidates[index]
    fresh = [i for i, c in enumerate(candidates) if not c.tried and c.skipped_until <= now]
    if fresh:  # never a skipped or already tried endpoint while a fresh one exists
        assert index in fresh
        if len(fresh) > 1:  # and at least as idle as another fresh one: never the busiest alone
            others = [candidates[i].outstanding for i in fresh if i != index]
            assert max(others) >= chosen.outstanding
    elif any(c.skipped_until <= now for c in candidates):
        assert chosen.skipped_until <= now  # a tried endpoint before a skipped one
    assert has_spare(candidates, now) == bool(fresh)


def test_a_skip_lasts_until_its_end_exactly() -> None:
    until = skipped_until(100.0, 1, SkipPolicy(initial_s=1.0))
    assert until == 101.0
    skipped_and_free = [Candidate(0, until, False), Candidate(7, 0.0, False)]
    assert choose(skipped_and_free, 100.999, 0.0, 0.0) == 1  # still skipped, though idle
    assert choose(skipped_and_free, 101.0, 0.0, 0.0) == 0  # free again, and less busy


def test_skips_double_with_failures_in_a_row_up_to_the_maximum() -> None:
    policy = SkipPolicy(initial_s=0.5, max_s=6.0)
    lengths = [skipped_until(0.0, n, policy) for n in range(1, 7)]
    assert lengths == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]
    assert skipped_until(0.0, 10_000, policy) == 6.0
    with pytest.raises(ValueError, match="initial_s"):
        SkipPolicy(initial_s=0.0)


def test_when_every_endpoint_is_skipped_one_is_still_chosen() -> None:
    all_skipped = [Candidate(3, 50.0, False), Candidate(1, 60.0, False)]
    assert choose(all_skipped, 10.0, 0.0, 0.0) == 1
    assert not has_spare(all_skipped, 10.0)
    tried_and_skipped = [Candidate(0, 50.0, True), Candidate(9, 0.0, True)]
    assert choose(tried_and_skipped, 10.0, 0.0, 0.0) == 1  # tried but up, before skipped


def test_what_each_outcome_does_to_its_endpoint() -> None:
    assert {o for o in Outcome if o.skips} == {
        Outcome.REFUSED,
        Outcome.DROPPED,
        Outcome.GOING_AWAY,
    }
    assert {o for o in Outcome if o.elsewhere_only} == {Outcome.DROPPED}


def test_a_retry_elsewhere_goes_at_once_within_the_retry_budget() -> None:
    policy = RetryPolicy(max_retries=2, backoff_initial_s=1.0, backoff_max_s=1.0)
    assert retry_delay_s(policy, 0, 30.0, 5.0, 0.5, elsewhere=True) == 0.0  # no Retry-After
    assert retry_delay_s(policy, 0, 30.0, 5.0, 0.5) is None  # the same endpoint: 30 s > 5 s
    assert retry_delay_s(policy, 2, None, 5.0, 0.5, elsewhere=True) is None  # budget spent
    assert retry_delay_s(None, 0, None, 5.0, 0.5, elsewhere=True) is None  # retries off
    assert retry_delay_s(policy, 0, None, 0.0, 0.5, elsewhere=True) is None  # no time left


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """Answers from a table that the test changes; counts the questions."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append((host, port))
        if host not in self.answers:
            raise OSError(f"no such host {host}")
        return self.answers[host]


def urls(endpoints: Endpoints) -> list[str]:
    return [e.address.base_url for e in endpoints.all]


async def test_a_name_stands_for_all_its_addresses_and_is_resolved_again_when_due() -> None:
    clock = FakeClock()
    resolver = FakeResolver({"mb.test": ["10.0.0.1", "10.0.0.2"]})
    endpoints = Endpoints(
        [Address.parse("http://mb.test:8000")], resolve_every_s=10.0, resolver=resolver, clock=clock
    )
    one, two = await endpoints.current()
    assert resolver.asked == [("mb.test", 8000)]
    assert urls(endpoints) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert two.address.host_header == "mb.test:8000"  # the name still goes in Host
    assert endpoints.acquire([one]) is two  # held: outstanding 1

    resolver.answers["mb.test"] = ["10.0.0.2", "10.0.0.3"]
    clock.now += 9.9
    await endpoints.current()
    assert len(resolver.asked) == 1  # not due yet
    clock.now += 0.1
    await endpoints.current()
    await asyncio.sleep(0)  # the new resolution runs in the background
    assert len(resolver.asked) == 2
    assert urls(endpoints) == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    assert endpoints.all[0] is two and two.outstanding == 1  # its state kept
    assert endpoints.all[1].outstanding == 0
    endpoints.release(two, Outcome.ANSWERED)


async def test_a_resolution_that_fails_or_finds_nothing_keeps_the_last_addresses() -> None:
    clock = FakeClock()
    resolver = FakeResolver({"mb.test": ["10.0.0.1"]})
    endpoints = Endpoints(
        [Address.parse("http://mb.test")], resolve_every_s=1.0, resolver=resolver, clock=clock
    )
    await endpoints.current()
    assert urls(endpoints) == ["http://10.0.0.1"]
    for answers in ({"mb.test": []}, {}):  # no address; then no such host
        resolver.answers = answers
        clock.now += 1.0
        await endpoints.current()
        await asyncio.sleep(0)
        assert urls(endpoints) == ["http://10.0.0.1"]
    assert [port for _, port in resolver.asked] == [80, 80, 80]


async def test_a_first_resolution_that_fails_is_a_connect_error_and_asked_again() -> None:
    resolver = FakeResolver({})
    endpoints = Endpoints(
        [Address.parse("http://mb.test:1")], resolve_every_s=60.0, resolver=resolver
    )
    with pytest.raises(client.ConnectError, match="cannot resolve"):
        await endpoints.refresh()
    resolver.answers["mb.test"] = ["::1"]
    await endpoints.refresh()
    endpoint = endpoints.acquire([])
    assert endpoint.address.base_url == "http://[::1]:1" and len(resolver.asked) == 2


async def test_literal_addresses_and_unix_sockets_are_not_resolved() -> None:
    resolver = FakeResolver({"mb.test": ["10.0.0.9"]})
    given_urls = ["http://127.0.0.1:1", "unix:///run/mb.sock", "https://mb.test:2/"]
    endpoints = Endpoints(
        [Address.parse(u) for u in given_urls], resolve_every_s=5.0, resolver=resolver
    )
    found = await endpoints.current()
    assert [e.address for e in found] == [
        Address("http://127.0.0.1:1"),
        Address("http://localhost", "/run/mb.sock"),
        Address("https://10.0.0.9:2", host_header="mb.test:2", tls_name="mb.test"),
    ]
    assert resolver.asked == [("mb.test", 2)]


async def test_release_counts_outstanding_skips_and_resets_failures() -> None:
    clock = FakeClock()
    endpoints = Endpoints(
        [Address.parse("http://127.0.0.1:1"), Address.parse("http://127.0.0.1:2")],
        clock=clock,
        skip=SkipPolicy(initial_s=2.0, max_s=60.0),
    )
    a, b = endpoints.all
    held = [endpoints.acquire([]) for _ in range(4)]
    assert a.outstanding + b.outstanding == 4
    assert abs(a.outstanding - b.outstanding) <= 1  # each pick goes to the less busy
    for endpoint in held:
        endpoints.release(endpoint, None)
    assert a.outstanding == b.outstanding == 0

    for expected in (1002.0, 1004.0, 1008.0):  # refused three times in a row: 2, 4, 8 s
        a.outstanding += 1  # as acquire counts it
        endpoints.release(a, Outcome.REFUSED)
        assert a.skipped_until == expected
    assert [endpoints.acquire([]) is b for _ in range(5)] == [True] * 5
    assert endpoints.has_spare([]) and not endpoints.has_spare([b])
    endpoints.release(a, Outcome.OVERLOADED)  # neither skips nor clears
    assert a.failures == 3
    endpoints.release(a, Outcome.ANSWERED)
    assert a.failures == 0
