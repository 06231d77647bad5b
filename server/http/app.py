"""The path table in front of the handlers, over aiohttp's low-level server (`web.Server`), with the
optional bearer-token check in front of it.

Event loop only. aiohttp's Application layer (router resolution, match info, the middleware
chain, the app-bound Request) was measured to cost about a third of the event loop's time per
request at saturation on the 2-core development machine; the server's routes are five fixed
paths and one pattern, so a dict lookup and one string split do the same job. Paths under /v2
(the Open Inference Protocol) go to oip_handlers.py after the /v1 routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from server.http import handlers, oip_handlers
from server.http.auth import OPEN_PATHS, PROBE_PATHS, authorized, unauthorized
from server.http.connections import ConnectionLimits, ConnectionServer
from server.http.incoming import Incoming
from server.http.request_body import LimitedRequest
from server.http.state import ServerState

Handler = Callable[[ServerState, Incoming], Awaitable[web.Response]]
_INFER_PREFIX = "/v1/models/"
_INFER_SUFFIX = "/infer"
_GET_ROUTES: dict[str, Handler] = {
    "/v1/models": handlers.list_models,
    "/healthz": handlers.healthz,
    "/readyz": handlers.readyz,
    "/metrics": handlers.metrics,
}
_READ_METHODS = frozenset(("GET", "HEAD"))
_OIP_ROOT = "/v2"  # the Open Inference Protocol (oip_handlers.py) owns /v2 and /v2/...


class PathTable:
    """Called by aiohttp with each request; answers it from the path table."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        token = state.config.server.auth_token
        self._token = token.encode() if token else None

    async def __call__(self, request: Incoming) -> web.Response:
        path = request.path
        if self._token is not None and path not in OPEN_PATHS:
            header = request.headers.get("Authorization")
            if header is None and path in PROBE_PATHS and request.method in _READ_METHODS:
                return handlers.readiness_probe(self._state, request)
            if not authorized(header, self._token):
                return oip_handlers.unauthorized(request) if is_oip(path) else unauthorized(request)
        model = infer_model(path)
        if model is not None:
            if request.method != "POST":
                return handlers.method_not_allowed(request, "POST")
            return await handlers.infer(self._state, request, model)
        route = _GET_ROUTES.get(path)
        if route is None:
            # Looked at only once /v1 has not matched: /v2 costs the /v1 paths nothing.
            if is_oip(path):
                return await oip_handlers.dispatch(self._state, request)
            return handlers.not_found(request)
        if request.method not in _READ_METHODS:
            return handlers.method_not_allowed(request, "GET")
        return await route(self._state, request)


def infer_model(path: str) -> str | None:
    """The model of `/v1/models/{model}/infer`, or None for any other path (a model name is
    one non-empty path segment)."""
    if not (path.startswith(_INFER_PREFIX) and path.endswith(_INFER_SUFFIX)):
        return None
    model = path[len(_INFER_PREFIX) : -len(_INFER_SUFFIX)]
    return model if model and "/" not in model else None


def is_oip(path: str) -> bool:
    return path.startswith(_OIP_ROOT) and (len(path) == 3 or path[3] == "/")


def create_server(state: ServerState, access_log: logging.Logger | None) -> ConnectionServer:
    """The low-level aiohttp server, its connections and request bodies bounded by the
    [server] limits (connections.py, request_body.py)."""
    max_body_bytes = state.config.server.max_body_bytes
    loop = asyncio.get_running_loop()

    def make_request(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: object,
        task: object,
    ) -> web.BaseRequest:
        return LimitedRequest(
            message,
            payload,
            protocol,
            writer,  # type: ignore[arg-type]
            task,  # type: ignore[arg-type]
            loop,
            client_max_size=max_body_bytes,
        )

    return ConnectionServer(
        PathTable(state),
        limits=ConnectionLimits.of(state.config.server),
        request_factory=make_request,
        handler_cancellation=True,  # a client that hangs up cancels its queued request
        access_log=access_log,
    )
