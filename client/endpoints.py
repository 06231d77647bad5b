"""The endpoints one client sends to: a fixed list of URLs, or each URL's host resolved to all its
addresses and resolved again every `resolve_every_s`; the bookkeeping the balancing policy
(client/balance.py) reads: requests outstanding per endpoint, skips, failures in a row.

Runs on the client's event loop; the clock and the resolver are injected (tests use a fake
clock and a resolver that needs no DNS server). Imports no aiohttp.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence

from client.balance import Candidate, Outcome, SkipPolicy, choose, has_spare, skipped_until
from client.errors import ConnectError
from client.transport import Address

log = logging.getLogger(__name__)

# host, port -> the host's IP addresses (as strings), in the order to use them.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class Endpoint:
    """One endpoint's state; read and written only on the client's event loop."""

    __slots__ = ("address", "failures", "outstanding", "skipped_until")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.outstanding = 0
        self.skipped_until = 0.0
        self.failures = 0  # failures in a row that skip the endpoint


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses as the system resolves them (getaddrinfo), duplicates dropped."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Endpoints:
    """Picks an endpoint per attempt and keeps the per-endpoint state the choice reads."""

    def __init__(
        self,
        addresses: Sequence[Address],
        *,
        resolve_every_s: float | None = None,
        resolver: Resolver = system_resolver,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        skip: SkipPolicy = SkipPolicy(),  # noqa: B008 - frozen, so safely shared
    ) -> None:
        if not addresses:
            raise ValueError("at least one URL is needed")
        if resolve_every_s is not None and not resolve_every_s > 0:
            raise ValueError(f"resolve_every_s must be > 0, got {resolve_every_s!r}")
        self._given = list(addresses)
        self._resolve_every_s = resolve_every_s
        self._resolver = resolver
        self._clock = clock or _loop_time
        self._rng = rng or random.Random()
        self._skip = skip
        self._resolved_at: float | None = None
        self._resolving: asyncio.Task[None] | None = None
        self.all: list[Endpoint] = [] if resolve_every_s else [Endpoint(a) for a in addresses]

    @property
    def resolves(self) -> bool:
        """The endpoints come from names: `refresh` before each `acquire`."""
        return self._resolve_every_s is not None

    async def current(self) -> list[Endpoint]:
        """The endpoints now (resolved first when they come from names)."""
        if self._resolve_every_s is not None:
            await self.refresh()
        return list(self.all)

    def acquire(self, tried: Sequence[Endpoint]) -> Endpoint:
        """The endpoint for the next attempt, counted as outstanding until `release`."""
        endpoints = self.all
        if len(endpoints) == 1:  # the common case costs no choice
            chosen = endpoints[0]
        else:
            now = self._clock()
            index = choose(self._candidates(tried), now, self._rng.random(), self._rng.random())
            chosen = endpoints[index]
        chosen.outstanding += 1
        return chosen

    def release(self, endpoint: Endpoint, outcome: Outcome | None) -> None:
        """The attempt is over; `outcome` None says nothing of the endpoint (a timeout)."""
        endpoint.outstanding -= 1
        if outcome is Outcome.ANSWERED:
            endpoint.failures = 0
        elif outcome is not None and outcome.skips:
            endpoint.failures += 1
            endpoint.skipped_until = skipped_until(self._clock(), endpoint.failures, self._skip)

    def has_spare(self, tried: Sequence[Endpoint]) -> bool:
        """Some endpoint is neither skipped nor tried by this call: a retry may go there now."""
        return len(self.all) > 1 and has_spare(self._candidates(tried), self._clock())

    def _candidates(self, tried: Sequence[Endpoint]) -> list[Candidate]:
        return [Candidate(e.outstanding, e.skipped_until, e in tried) for e in self.all]

    async def refresh(self) -> None:
        """Resolve on first use (waited for), then every resolve_every_s in the background."""
        assert self._resolve_every_s is not None
        now = self._clock()
        idle = self._resolving is None or self._resolving.done()
        if idle and (self._resolved_at is None or now - self._resolved_at >= self._resolve_every_s):
            self._resolved_at = now
            self._resolving = asyncio.ensure_future(self._resolve())
        if not self.all:  # nothing resolved yet: this attempt waits for the answer
            if self._resolving is not None:
                await asyncio.shield(self._resolving)
            if not self.all:
                self._resolved_at = None  # the next attempt asks again
                raise ConnectError(f"cannot resolve {_names(self._given)} to any address")

    async def _resolve(self) -> None:
        """Replace the endpoints by a new resolution; on failure keep the old ones (better
        than none) until the next period."""
        try:
            found = [a for address in self._given for a in await self._addresses_of(address)]
        except Exception:  # a background task's boundary: a resolver that fails is logged
            log.warning("cannot resolve %s", _names(self._given), exc_info=True)
            return
        if not found:
            log.warning("%s resolved to no address; keeping the last ones", _names(self._given))
            return
        self.all = merge(self.all, found)

    async def _addresses_of(self, address: Address) -> list[Address]:
        parts = urllib.parse.urlsplit(address.base_url)
        host = parts.hostname
        if address.socket_path is not None or host is None or _is_ip(host):
            return [address]  # nothing to resolve
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return [address.resolved(ip) for ip in await self._resolver(host, port)]

    def close(self) -> None:
        if self._resolving is not None:
            self._resolving.cancel()


def merge(current: Sequence[Endpoint], found: Sequence[Address]) -> list[Endpoint]:
    """The endpoints for a new resolution: those still resolved keep their state (outstanding
    requests, skips), new addresses start afresh, the rest are dropped (requests already sent
    to them still finish)."""
    by_address = {e.address: e for e in current}
    return [by_address.get(a) or Endpoint(a) for a in dict.fromkeys(found)]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _names(addresses: Sequence[Address]) -> str:
    return ", ".join(a.base_url for a in addresses)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
