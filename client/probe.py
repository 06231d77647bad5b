"""Health and readiness probes of a client's endpoints: each endpoint asked once, at the same
time, never retried; yes when any of them says yes.

Runs on the client's event loop. Imports no aiohttp (client/transport.py does that).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from client.call import Deadline, Retrying, send
from client.endpoints import Endpoint, Endpoints
from client.errors import ConnectError, ServerError
from client.transport import Address, Transport


async def probe(
    transport: Transport,
    endpoints: Sequence[Endpoint],
    path: str,
    deadline: Deadline,
    rng: random.Random,
) -> bool:
    """True when any endpoint answers `path` with 2xx; False when every one refuses the
    connection or answers 503; else the first other failure (a Timeout, say) is raised."""
    answers = await asyncio.gather(
        *(_probe_one(transport, e.address, path, deadline, rng) for e in endpoints),
        return_exceptions=True,
    )
    if True in answers:
        return True
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return False


async def _probe_one(
    transport: Transport, address: Address, path: str, deadline: Deadline, rng: random.Random
) -> bool:
    try:
        await send(
            transport,
            Endpoints([address]),
            "GET",
            path,
            _no_body,
            {},
            deadline,
            Retrying(None, rng),
        )
    except ConnectError:
        return False
    except ServerError as exc:
        if exc.http_status == 503:
            return False
        raise
    return True


def _no_body(remaining_s: float) -> None:
    return None
