"""HTTP exchanges over pooled aiohttp client sessions: TCP (http://host:port) or Unix sockets
(unix:///path/to.sock); keep-alive connections are reused across calls. The project's one HTTP
client: the load generator (bench/loadgen/driver.py) sends through it too.

Runs on the event loop that first uses it (the session is made there, lazily). aiohttp is
imported on first use (it costs more than the rest of the client to import) and only its client
parts, never aiohttp.web. aiohttp's exceptions end here, as TransportError (ConnectError for
the failures a retry cannot repeat: no connection made, or a stale keep-alive connection;
Disconnected for a new connection closed before any answer).
"""

from __future__ import annotations

import asyncio
import errno
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

from client.errors import ConnectError, Disconnected, Timeout, TransportError

if TYPE_CHECKING:
    import aiohttp


@dataclass(frozen=True)
class Address:
    """Where requests go: the base URL, and the socket path when the server is on a Unix socket.

    `host_header` and `tls_name` are set for an address resolved from a name (client/endpoints.py):
    requests then carry the name in their Host header, and TLS checks the certificate for it.
    """

    base_url: str
    socket_path: str | None = None
    host_header: str | None = None
    tls_name: str | None = None

    @classmethod
    def parse(cls, url: str) -> Address:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "unix":
            path = urllib.parse.unquote(parts.netloc + parts.path)
            if not path:
                raise ValueError(f"a unix URL needs a socket path (unix:///path/to.sock): {url!r}")
            return cls("http://localhost", path)
        if parts.scheme in ("http", "https") and parts.netloc:
            return cls(url.rstrip("/"))
        raise ValueError(f"URL must be http://host:port or unix:///path/to.sock, got {url!r}")

    def resolved(self, ip: str) -> Address:
        """This http(s) address with its host replaced by the address `ip`, the name kept."""
        parts = urllib.parse.urlsplit(self.base_url)
        host = f"[{ip}]" if ":" in ip else ip
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
        return Address(
            urllib.parse.urlunsplit(parts._replace(netloc=netloc)),
            host_header=parts.netloc,
            tls_name=parts.hostname if parts.scheme == "https" else None,
        )


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    retry_after: str | None


class Transport:
    """Lazily made aiohttp sessions: one for every TCP address (at most `max_connections` in
    flight over all of them) and one per Unix socket; `request` returns any status as a Reply."""

    def __init__(self, max_connections: int, token: str | None = None) -> None:
        self._max_connections = max_connections
        # Sent with every request: the server's bearer token (server.auth_token), if it has one.
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}  # by socket path
        self._closed = False

    def _session_for(self, socket_path: str | None) -> aiohttp.ClientSession:
        import aiohttp

        if self._closed:
            raise RuntimeError("the client is closed")
        session = self._sessions.get(socket_path)
        if session is None:  # made here, on the running loop, which it then belongs to
            connector: aiohttp.BaseConnector
            if socket_path is not None:
                connector = aiohttp.UnixConnector(socket_path, limit=self._max_connections)
            else:
                connector = aiohttp.TCPConnector(limit=self._max_connections)
            session = aiohttp.ClientSession(connector=connector, trace_configs=[_reuse_trace()])
            self._sessions[socket_path] = session
        return session

    async def request(
        self,
        address: Address,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str],
        timeout_s: float,
    ) -> Reply:
        import aiohttp

        session = self._session_for(address.socket_path)
        where = address.socket_path or address.base_url
        attempt = _Attempt()
        sent_headers = {**headers, **self._auth}
        if address.host_header is not None:  # an address resolved from a name: keep the name
            sent_headers["Host"] = address.host_header
        try:
            async with session.request(
                method,
                address.base_url + path,
                data=body,
                headers=sent_headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                trace_request_ctx=attempt,
                server_hostname=address.tls_name,
            ) as response:
                attempt.answered = True
                data = await response.read()
                return Reply(
                    response.status,
                    response.headers.get("Content-Type", ""),
                    data,
                    response.headers.get("Retry-After"),
                )
        except asyncio.TimeoutError:
            raise Timeout(
                f"{method} {path}: no answer from {where} within {timeout_s:.3g} s"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise TransportError(f"{method} {path}: TLS failure with {where}: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            # Raised while connecting, so the request was never sent: a retry cannot repeat it.
            raise ConnectError(f"{method} {path}: cannot connect to {where}: {exc}") from exc
        except aiohttp.ClientConnectionError as exc:
            if attempt.answered or not _closed_unanswered(exc):
                raise TransportError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            if attempt.reused:
                raise ConnectError(
                    f"{method} {path}: {where} closed a reused keep-alive connection before "
                    f"answering ({type(exc).__name__}: {exc})",
                    stale=True,
                ) from exc
            raise Disconnected(
                f"{method} {path}: {where} closed a new connection before answering "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


class _Attempt:
    """What one request saw: given to aiohttp as its trace context, filled by the trace hook."""

    __slots__ = ("answered", "reused")

    def __init__(self) -> None:
        self.reused = False  # sent on a pooled keep-alive connection, not a new one
        self.answered = False  # the response's status line and headers arrived


def _reuse_trace() -> aiohttp.TraceConfig:
    import aiohttp

    async def on_reuse(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceConnectionReuseconnParams,
    ) -> None:
        attempt = context.trace_request_ctx
        if isinstance(attempt, _Attempt):
            attempt.reused = True

    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(on_reuse)
    return trace


def _closed_unanswered(exc: BaseException) -> bool:
    """The server closed the connection (FIN) or reset it (RST) before one byte of an answer
    came, or before the request was even written out. Safe to send again, although a POST is
    not idempotent, because the server computes a request only after reading its whole body
    (server/http/handlers.py reads it before decoding or queueing anything): a reset means bytes
    we sent went unread, and a body we could not finish writing was never read whole, so the
    request was never computed; a close means the server dropped a connection it thought idle
    (keep-alive expiry, shutdown), or died after reading, and then at worst the model runs
    twice on the same input, which has no effect beyond the cost: inference is a pure function.
    """
    import aiohttp

    if isinstance(exc, aiohttp.ServerDisconnectedError):
        # aiohttp's C parser hands over any partial answer as exc.message (even b"HTT" makes
        # a message); a string is its own "Server disconnected": not a byte came. (The pure-
        # Python parser says that in both cases; see above for why a retry is still harmless.)
        return isinstance(exc.message, str)
    # aiohttp wraps a failure to write the body ("Can not write request body", no errno) around
    # the reset it met (a ConnectionResetError: "Cannot write to closing transport").
    return any(_is_reset(e) for e in (exc, exc.__cause__) if e is not None)


def _is_reset(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionResetError, BrokenPipeError)) or getattr(
        exc, "errno", None
    ) in (errno.ECONNRESET, errno.EPIPE)
