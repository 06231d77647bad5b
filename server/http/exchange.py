"""One HTTP request of either protocol, answered without a transport: a `Call` (method, path,
headers, body bytes) in, an `Answer` (status, headers, body bytes) out, through the same path
table, token check, limits, admission, queues and error rendering as the aiohttp server.

Event loop of the process that owns the engine (server/engine.py). `Call` and `Answer` are
plain frozen data, made to cross process boundaries (a Ray Serve front and its replica; later,
front processes over one batcher). The transport's own jobs stay with the transport: reading
the body off the socket, 100-continue, keep-alive and `Connection: close`, Content-Length.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from server.errors import ServingError
from server.http import handlers, oip_handlers
from server.http.app import PathTable, is_oip
from server.http.incoming import BufferedRequest
from server.http.state import ServerState

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Call:
    method: str  # GET, POST, ...
    path: str  # without the query string, percent-decoded (as aiohttp's request.path)
    headers: Headers  # as sent: names in any case, repeats kept
    body: bytes  # as sent (still compressed if its Content-Encoding says so)

    @staticmethod
    def of(method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes) -> Call:
        return Call(method, path, tuple(headers), body)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Headers  # Content-Type and the like; no Content-Length (the transport's)
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


class Exchange:
    """Answers Calls from one engine's state (called on the engine's event loop)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._table = PathTable(state)

    async def __call__(self, call: Call) -> Answer:
        settings = self._state.config.server
        request = BufferedRequest(
            call.method,
            call.path,
            call.headers,
            call.body,
            max_body_bytes=settings.max_body_bytes,
            max_decompressed_bytes=settings.max_decompressed_bytes,
        )
        return answer_of(await self._table(request))


def answer_of(response: web.Response) -> Answer:
    body = response.body
    if not isinstance(body, bytes):  # every handler answers bytes; anything else is a bug here
        raise TypeError(f"a handler answered a body of type {type(body).__name__}")
    return Answer(response.status, tuple(response.headers.items()), body)


def error_answer(call: Call, error: ServingError) -> Answer:
    """`error` as the server itself would render it for this call: /v2's JSON for /v2 paths,
    else /v1's body in the request's encoding. For a front that could not reach an engine."""
    if is_oip(call.path):
        return answer_of(oip_handlers.error_response(error))
    request = BufferedRequest(
        call.method, call.path, call.headers, b"", max_body_bytes=0, max_decompressed_bytes=0
    )
    return answer_of(handlers.error_response(error, handlers.reply_encoding(request)))
