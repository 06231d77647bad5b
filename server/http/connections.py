"""Bounds every HTTP connection: how long a new connection may take to send its first request
head (server.head_timeout_s), how long a kept-alive connection may sit idle
(server.keepalive_timeout_s), and how many may be open (server.max_connections; beyond it a new
connection gets a 503 and is closed at once). Also the drain's side of a connection: once the
drain begins, every answer carries `Connection: close`, and an idle connection is closed only
after a grace in which its client may still send (server/drain.py says when).

Event loop only. Subclasses aiohttp's low-level `Server` and `RequestHandler` and rides on the
handler's own keep-alive timer, so a request on a kept-alive connection does the work it does in
aiohttp plus one flag test when its answer is written. The body's limits: request_body.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Collection, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.config import ServerSettings
from server.errors import ErrorCode
from server.protocol.codec import CONTENT_TYPE_OF, JSON, error_body

log = logging.getLogger(__name__)
_finish_response = RequestHandler.finish_response


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    max_decompressed_bytes: int

    @classmethod
    def of(cls, settings: ServerSettings) -> ConnectionLimits:
        return cls(
            settings.head_timeout_s,
            settings.body_timeout_s,
            settings.keepalive_timeout_s,
            settings.max_connections,
            settings.max_decompressed_bytes,
        )


class Connection(RequestHandler):
    """One client connection (aiohttp's protocol object for it)."""

    __slots__ = ("_closing", "_server")

    def __init__(self, server: ConnectionServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server  # aiohttp drops its own reference when the connection is lost
        self._closing = server.closing

    @property
    def limits(self) -> ConnectionLimits:
        return self._server.limits

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if len(server.open) >= server.limits.max_connections:
            self._manager = None  # never registered: aiohttp's connection_lost has nothing to do
            self._force_close = True  # and whatever the client sends is ignored
            server.refuse(transport)
            return
        super().connection_made(transport)
        server.open.add(self)
        # aiohttp armed its keep-alive timer with the idle limit; until its first request head
        # has come, a connection has the head limit instead (or the drain's grace, if shorter).
        first_s = server.limits.head_timeout_s
        if self._closing:
            first_s = min(first_s, server.idle_grace_s)
        self._close_if_idle_at(self._loop.time() + first_s)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._server.forget(self)
        super().connection_lost(exc)

    def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # The one addition to a request's path: a flag test (and the base method called
        # directly, cheaper than super()).
        if self._closing:
            resp.force_close()  # the drain: the client learns not to send on this connection
        return _finish_response(self, request, resp, start_time)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (a bad header, a body that is not
        what its Content-Encoding says): our error body instead of plain text, logged at debug
        level (a client's garbage must not flood the log)."""
        if status != 400:
            return super().handle_error(request, status, exc, message)
        log.debug("malformed request from %s: %s", request.remote, message)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already being sent")
        text = f"malformed HTTP request: {message or exc}"
        response = web.Response(
            status=400,
            body=error_body(ErrorCode.BAD_REQUEST.value, text, JSON),
            content_type=CONTENT_TYPE_OF[JSON],
        )
        response.force_close()
        return response

    def close_after_answer(self) -> None:
        """The next answer on this connection carries `Connection: close`, and the connection
        closes once it is written."""
        self._closing = True

    def close_when_idle(self, at: float) -> None:
        """The drain: close after the next answer, or at `at` if no request head has come."""
        self._closing = True
        self._close_if_idle_at(at)

    def close_stalled(self) -> None:
        """The body reader saw no byte for server.body_timeout_s."""
        if self.transport is not None:
            self._server.closed["body_timeout"] += 1
            self.force_close()

    def _close_if_idle_at(self, at: float) -> None:
        # aiohttp's keep-alive check closes the connection at `at` if it is still waiting for
        # a request head then, and otherwise leaves it alone (it re-arms after each answer).
        handle = self._keepalive_handle
        if handle is not None:
            handle.cancel()
        self._next_keepalive_close_time = at
        self._keepalive_handle = self._loop.call_at(at, self._process_keepalive)

    def _process_keepalive(self) -> None:
        was_open = self.transport is not None
        super()._process_keepalive()
        if was_open and self.transport is None:
            reason = "head_timeout" if self._request_count == 0 else "idle_timeout"
            self._server.closed["drain_idle" if self._closing else reason] += 1


class ConnectionServer(web.Server):
    """aiohttp's low-level server, making `Connection`s and keeping count of them."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(handler, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self.limits = limits
        self.closing = False  # the drain has begun: every answer closes its connection
        self.idle_grace_s = limits.head_timeout_s
        self.open: set[Connection] = set()
        self.closed: Counter[str] = Counter()  # connections the server closed, by reason
        self._handler_kwargs = kwargs
        self._gone: asyncio.Future[None] | None = None
        self._refusal = _refusal(limits.max_connections)

    def __call__(self) -> Connection:
        kwargs = {k: v for k, v in self._handler_kwargs.items() if k not in _SERVER_ONLY}
        return Connection(
            self,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self.limits.keepalive_timeout_s,
            **kwargs,
        )

    def refuse(self, transport: asyncio.BaseTransport) -> None:
        self.closed["over_limit"] += 1
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        cast(asyncio.Transport, transport).write(self._refusal)
        transport.close()

    def forget(self, connection: Connection) -> None:
        self.open.discard(connection)
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    # The drain (server/drain.py) ----------------------------------------------------------
    def close_after_answers(self) -> None:
        """From now on every answer carries `Connection: close`, new connections' too."""
        self.closing = True
        for connection in self.open:
            connection.close_after_answer()

    def close_idle(self, grace_s: float) -> list[Connection]:
        """Close every connection after its next answer, or once it has had no request head
        for `grace_s` from now; the connections open now."""
        self.closing = True
        self.idle_grace_s = min(self.idle_grace_s, grace_s)
        at = asyncio.get_running_loop().time() + grace_s
        for connection in self.open:
            connection.close_when_idle(at)
        return list(self.open)

    async def adopt(self, sock: Any) -> None:
        """Serve a connection accepted outside the event loop's own accept (the backlog)."""
        await asyncio.get_running_loop().connect_accepted_socket(self, sock)

    async def wait_closed(self, connections: Collection[Connection], timeout_s: float) -> bool:
        """True once none of `connections` is open, False if `timeout_s` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(c in self.open for c in connections):
            self._gone = loop.create_future()
            try:
                await asyncio.wait_for(self._gone, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return False
            finally:
                self._gone = None
        return True


_SERVER_ONLY = frozenset(("request_factory", "handler_cancellation", "loop"))


def _refusal(max_connections: int) -> bytes:
    """The whole answer to a connection over server.max_connections, written before closing."""
    body = error_body(
        ErrorCode.OVERLOADED.value,
        f"the server has server.max_connections ({max_connections}) connections open; retry later",
        JSON,
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Content-Type: {CONTENT_TYPE_OF[JSON]}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionMetrics(Collector):
    """`microbatch_open_connections` and `microbatch_closed_connections_total{reason}`."""

    def __init__(self, server: ConnectionServer) -> None:
        self._server = server

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        open_now = GaugeMetricFamily("microbatch_open_connections", "Open client connections.")
        open_now.add_metric([], len(self._server.open))
        yield open_now
        closed = CounterMetricFamily(
            "microbatch_closed_connections",
            "Connections the server closed: head_timeout, body_timeout, idle_timeout, "
            "over_limit (server.max_connections), drain_idle.",
            labels=["reason"],
        )
        for reason, count in sorted(self._server.closed.items()):
            closed.add_metric([reason], count)
        yield closed
