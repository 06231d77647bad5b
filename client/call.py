"""One logical request under the call's deadline: attempts, retry waits, and error answers
turned into their exceptions.

Runs on the client's event loop. The deadline is a reading of the loop's monotonic clock; the
decision to retry is the pure `retry_delay_s`, this module only sends, sleeps and raises.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from client.errors import ConnectError, MicrobatchError, Timeout
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
    method: str,
    path: str,
    body_for: Callable[[float], bytes | None],
    headers: Mapping[str, str],
    deadline: Deadline,
    retrying: Retrying,
) -> Reply:
    """The first 2xx reply; a non-retryable failure, or the last one, is raised.

    `body_for(remaining_s)` builds each attempt's body, so the time left travels with it.
    """
    retries = 0
    while True:
        remaining_s = deadline.remaining_s()
        if remaining_s <= 0:
            raise _timeout(method, path, deadline)
        failure: MicrobatchError
        try:
            reply = await transport.request(
                method, path, body=body_for(remaining_s), headers=headers, timeout_s=remaining_s
            )
        except ConnectError as exc:
            failure, retry_after_s = exc, None
        except Timeout:
            raise _timeout(method, path, deadline) from None
        else:
            if reply.status < 400:
                return reply
            error = decode_error(reply.status, reply.content_type, reply.body, reply.retry_after)
            if not error.retryable:
                raise error
            failure, retry_after_s = error, error.retry_after_s
        delay_s = retry_delay_s(
            retrying.policy, retries, retry_after_s, deadline.remaining_s(), retrying.rng.random()
        )
        if delay_s is None:
            raise failure
        log.debug("%s %s: %s; retry %d in %.3f s", method, path, failure, retries + 1, delay_s)
        await asyncio.sleep(delay_s)
        retries += 1


def _timeout(method: str, path: str, deadline: Deadline) -> Timeout:
    return Timeout(f"{method} {path}: no answer within the call's timeout of {deadline.budget_s} s")
