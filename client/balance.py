"""Which endpoint a request goes to, and which endpoints sit out for a while: pure functions.

Power of two choices on outstanding requests among the endpoints that are neither skipped nor
already tried by the call; an endpoint that refused a connection, dropped a new one unanswered
or said it is going away (503 shutting_down or not_ready) is skipped for a while that doubles
with each failure in a row. Runs wherever the client runs; no I/O, no clock, no randomness of
its own (the caller passes the time and uniform draws), so the policy is tested with numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    """What one attempt on one endpoint came to, as far as balancing cares."""

    ANSWERED = "answered"  # an answer that is none of the retryable failures below
    REFUSED = "refused"  # no connection could be made: the request was never sent
    STALE = "stale"  # a reused keep-alive connection closed before any byte of an answer
    DROPPED = "dropped"  # a new connection closed before any byte of an answer
    GOING_AWAY = "going_away"  # 503 shutting_down or not_ready
    OVERLOADED = "overloaded"  # 503 overloaded

    @property
    def skips(self) -> bool:
        """The endpoint is skipped for a while: it is down, starting, draining or broken.

        A stale connection is not such a sign (servers close idle connections), nor is
        overload (the next request may well fit, and skipping would pile load on the others).
        """
        return self in (Outcome.REFUSED, Outcome.DROPPED, Outcome.GOING_AWAY)

    @property
    def elsewhere_only(self) -> bool:
        """Retried only on an endpoint this call has not tried: the server may have failed on
        this very request (it read it, then closed), so it is not sent there again."""
        return self is Outcome.DROPPED


@dataclass(frozen=True)
class SkipPolicy:
    """How long a failing endpoint sits out: `initial_s`, doubling with each failure in a row
    (a success resets the count), at most `max_s`."""

    initial_s: float = 1.0
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")


@dataclass(frozen=True)
class Candidate:
    """One endpoint as the choice sees it."""

    outstanding: int  # requests sent to it and not yet answered, by this client
    skipped_until: float  # a clock reading; in the past (or 0.0) when not skipped
    tried: bool  # already tried by the call that is choosing


def skipped_until(now: float, failures_in_a_row: int, policy: SkipPolicy) -> float:
    """When an endpoint that has just failed for the `failures_in_a_row`-th time (>= 1) may be
    chosen again."""
    doublings = min(max(failures_in_a_row - 1, 0), 32)  # 2**32 s is past any max_s
    return now + min(policy.max_s, policy.initial_s * 2.0**doublings)


def choose(candidates: Sequence[Candidate], now: float, first: float, second: float) -> int:
    """The index of the endpoint for the next attempt: of two drawn at random from the best
    group, the one with fewer outstanding requests (a tie goes to the first drawn).

    The groups, best first: neither skipped nor tried; not skipped; not tried; all. So a
    call never waits on a skipped endpoint while another may answer, and still has somewhere
    to go when every endpoint is skipped. `first` and `second` are uniform draws from [0, 1).
    """
    group = _best_group(candidates, now)
    if len(group) == 1:
        return group[0]
    i = min(int(first * len(group)), len(group) - 1)
    j = min(int(second * (len(group) - 1)), len(group) - 2)
    if j >= i:  # two distinct members, each pair equally likely
        j += 1
    a, b = group[i], group[j]
    return b if candidates[b].outstanding < candidates[a].outstanding else a


def has_spare(candidates: Sequence[Candidate], now: float) -> bool:
    """Whether some endpoint is neither skipped nor tried: a retry can go there at once."""
    return any(not c.tried and c.skipped_until <= now for c in candidates)


def _best_group(candidates: Sequence[Candidate], now: float) -> list[int]:
    indexes = range(len(candidates))
    for keep in (
        lambda c: not c.tried and c.skipped_until <= now,
        lambda c: c.skipped_until <= now,
        lambda c: not c.tried,
    ):
        group = [i for i in indexes if keep(candidates[i])]
        if group:
            return group
    return list(indexes)
