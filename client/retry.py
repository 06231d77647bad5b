"""When to retry a failed request and how long to wait first: a pure function over numbers.

Runs wherever the client runs; no I/O, no clock, no randomness of its own (the caller passes a
uniform draw), so the policy is tested with plain numbers.
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with jittered exponential backoff; `AsyncClient(retry=None)` turns them off.

    Only failures marked retryable are retried: 503 overloaded, shutting_down and not_ready,
    connections that could not be made (so the request was never sent), and a reused keep-alive
    connection the server closed before any byte of an answer; with several endpoints, also a
    new connection closed before any answer, on another endpoint. A 4xx, a 500 or a 504 is
    never retried, and no retry starts past the call's own timeout. `max_retries` counts
    retries on other endpoints too.
    """

    max_retries: int = 3
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not (0 <= self.backoff_initial_s <= self.backoff_max_s):
            raise ValueError(
                "need 0 <= backoff_initial_s <= backoff_max_s, got "
                f"{self.backoff_initial_s} and {self.backoff_max_s}"
            )
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier}")


def retry_delay_s(
    policy: RetryPolicy | None,
    retries_done: int,
    retry_after_s: float | None,
    remaining_s: float,
    uniform: float,
    *,
    elsewhere: bool = False,
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up now.

    `retries_done` counts the retries already made; `uniform` is a draw from [0, 1) that
    spreads the wait over the upper half of the backoff, so that clients turned away together
    do not come back together. The server's Retry-After is a floor; when even that would end
    past the call's remaining time, retrying is pointless and the failure stands.
    `elsewhere`: the next attempt goes to another endpoint, one neither tried by this call nor
    skipped, so it goes at once (the failed endpoint's backoff and Retry-After are its own).
    """
    if policy is None or retries_done >= policy.max_retries:
        return None
    if elsewhere:
        return 0.0 if remaining_s > 0 else None
    ceiling = min(
        policy.backoff_max_s,
        policy.backoff_initial_s * policy.backoff_multiplier**retries_done,
    )
    delay = ceiling * (0.5 + 0.5 * uniform)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    if delay >= remaining_s:
        return None
    return delay


def parse_retry_after(value: str | None, now_epoch_s: float) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - now_epoch_s)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
