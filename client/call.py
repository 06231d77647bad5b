"""One logical request under the call's deadline: attempts, retry waits, and error answers
turned into their exceptions.

Runs on the client's event loop. The deadline is a reading of the loop's monotonic clock; the
decision to retry is the pure `retry_delay_s`, the choice of endpoint the pure client/balance.py
(through client/endpoints.py); this module only sends, sleeps and raises.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from client.balance import Outcome
from client.endpoints import Endpoint, Endpoints
from client.errors import (
    ConnectError,
    Disconnected,
    MicrobatchError,
    NotReady,
    Overloaded,
    ServerError,
    ShuttingDown,
    Timeout,
)
from client.retry import RetryPolicy, retry_delay_s
from client.transport import Reply, Transport
from client.wire import decode_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deadline:
    """When the call must be over, on the event loop's clock, and the budget it was given."""

    at: float
    budget_s: float

    @classmethod
    def after(cls, budget_s: float) -> Deadline:
        if not budget_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {budget_s!r}")
        return cls(asyncio.get_running_loop().time() + budget_s, budget_s)

    def remaining_s(self) -> float:
        return self.at - asyncio.get_running_loop().time()


@dataclass(frozen=True)
class Retrying:
    """How a call retries: the policy (None: never) and the source of jitter."""

    policy: RetryPolicy | None
    rng: random.Random


async def send(
    transport: Transport,
    endpoints: Endpoints,
    method: str,
    path: str,
    body_for: Callable[[float], bytes | None],
    headers: Mapping[str, str],
    deadline: Deadline,
    retrying: Retrying,
) -> Reply:
    """The first 2xx reply; a non-retryable failure, or the last one, is raised.

    `body_for(remaining_s)` builds each attempt's body, so the time left travels with it. Each
    attempt goes to the endpoint the balancer picks; a retry goes at once to another endpoint
    when one is neither tried by this call nor skipped, else after the policy's backoff.
    """
    retries = 0
    tried: list[Endpoint] = []
    while True:
        remaining_s = deadline.remaining_s()
        if remaining_s <= 0:
            raise _timeout(method, path, deadline)
        try:
            result = await _attempt(
                transport,
                endpoints,
                tried,
                method,
                path,
                body_for(remaining_s),
                headers,
                remaining_s,
            )
        except Timeout:
            raise _timeout(method, path, deadline) from None
        if isinstance(result, Reply):
            return result
        elsewhere = endpoints.has_spare(tried)
        if result.outcome.elsewhere_only and not elsewhere:
            raise result.error
        delay_s = retry_delay_s(
            retrying.policy,
            retries,
            result.retry_after_s,
            deadline.remaining_s(),
            retrying.rng.random(),
            elsewhere=elsewhere,
        )
        if delay_s is None:
            raise result.error
        log.debug("%s %s: %s; retry %d in %.3f s", method, path, result.error, retries + 1, delay_s)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        retries += 1


@dataclass(frozen=True)
class _Failure:
    """An attempt that failed in a way a retry may mend."""

    error: MicrobatchError
    retry_after_s: float | None
    outcome: Outcome


async def _attempt(
    transport: Transport,
    endpoints: Endpoints,
    tried: list[Endpoint],
    method: str,
    path: str,
    body: bytes | None,
    headers: Mapping[str, str],
    remaining_s: float,
) -> Reply | _Failure:
    """One attempt on the endpoint the balancer picks (added to `tried`): the 2xx reply or a
    retryable failure; anything else is raised (a Timeout as the call's own)."""
    if endpoints.resolves:
        await endpoints.refresh()
    endpoint = endpoints.acquire(tried)
    tried.append(endpoint)
    outcome: Outcome | None = None  # None: says nothing of the endpoint (timeout, cancel)
    try:
        reply = await transport.request(
            endpoint.address, method, path, body=body, headers=headers, timeout_s=remaining_s
        )
    except ConnectError as exc:
        outcome = Outcome.STALE if exc.stale else Outcome.REFUSED
        return _Failure(exc, None, outcome)
    except Disconnected as exc:
        outcome = Outcome.DROPPED
        return _Failure(exc, None, outcome)
    else:
        outcome = Outcome.ANSWERED
        if reply.status < 400:
            return reply
        error = decode_error(reply.status, reply.content_type, reply.body, reply.retry_after)
        outcome = _OUTCOMES.get(type(error), Outcome.ANSWERED)
        if not error.retryable:
            raise error from None
        return _Failure(error, error.retry_after_s, outcome)
    finally:
        endpoints.release(endpoint, outcome)


_OUTCOMES: dict[type[ServerError], Outcome] = {
    Overloaded: Outcome.OVERLOADED,
    ShuttingDown: Outcome.GOING_AWAY,
    NotReady: Outcome.GOING_AWAY,
}


def _timeout(method: str, path: str, deadline: Deadline) -> Timeout:
    return Timeout(f"{method} {path}: no answer within the call's timeout of {deadline.budget_s} s")
