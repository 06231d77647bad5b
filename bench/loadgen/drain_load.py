"""Keep-alive clients against a server that is told to drain: how many of their requests ended
without an HTTP answer. Used by scripts/drain_check.py and tests/test_drain.py.

Runs in the caller's event loop (client side only; aiohttp's client, never its server). Each
client reuses its keep-alive connection, backs off briefly after a 503 and stops at the first
refused connection: the server has closed its listener, and a refused connection never
reached it. Any other failure (a reset, a connection closed without an answer) is what a drain
must not cause, and is counted as a transport error.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import msgpack
import numpy as np

from server.protocol.codec import MSGPACK, encode, encode_tensor

BACKOFF_S = (0.02, 0.08)  # a 503 is followed by a pause drawn from this range
_SEND_TIMEOUT_S = 30.0


@dataclass
class DrainTally:
    answers: Counter[str] = field(default_factory=Counter)  # "200", "503 shutting_down", ...
    transport_errors: Counter[str] = field(default_factory=Counter)  # by exception name
    refused: int = 0  # clients stopped by a refused connection (the listener had closed)

    @property
    def errors(self) -> int:
        return sum(self.transport_errors.values())


def linear_body() -> bytes:
    """One `linear` sample as msgpack: the cheapest request the built-in models take."""
    x = np.arange(10, dtype=np.float32)
    return encode({"inputs": {"x": encode_tensor(x, MSGPACK)}}, MSGPACK)


async def drain_under_load(
    url: str,
    pid: int,
    clients: int = 48,
    model: str = "linear",
    body: bytes | None = None,
    warmup_answers: int = 200,
    stop_s: float = 60.0,
) -> DrainTally:
    """Run `clients` keep-alive clients, send SIGTERM to `pid` once they have had
    `warmup_answers` answers between them, and return the tally once every client stopped."""
    tally = DrainTally()
    body = body if body is not None else linear_body()
    answered = asyncio.Event()
    target = f"{url}/v1/models/{model}/infer"

    def count(key: str) -> None:
        tally.answers[key] += 1
        if sum(tally.answers.values()) >= warmup_answers:
            answered.set()

    tasks = [
        asyncio.create_task(_client(target, body, tally, count, random.Random(i)))
        for i in range(clients)
    ]
    try:
        await asyncio.wait_for(answered.wait(), stop_s)
        os.kill(pid, signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), stop_s)
    finally:
        for task in tasks:
            task.cancel()
    return tally


async def _client(
    target: str,
    body: bytes,
    tally: DrainTally,
    count: Callable[[str], None],
    rng: random.Random,
) -> None:
    headers = {"Content-Type": "application/msgpack"}
    timeout = aiohttp.ClientTimeout(total=_SEND_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while True:
            try:
                async with session.post(target, data=body, headers=headers) as response:
                    raw = await response.read()
                    status = response.status
            except aiohttp.ClientConnectorError:
                tally.refused += 1
                return
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                tally.transport_errors[type(exc).__name__] += 1
                continue
            count(f"{status} {_error_code(status, raw)}".strip())
            if status == 503:
                await asyncio.sleep(rng.uniform(*BACKOFF_S))


def _error_code(status: int, raw: bytes) -> str:
    if status == 200:
        return ""
    try:
        return str(msgpack.unpackb(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "(no error body)"
