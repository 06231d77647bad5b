"""Open Inference Protocol (KServe v2) endpoints under /v2: health, metadata, Triton's model
configuration and statistics, and infer, over the same queues, admission, limits and metrics
as /v1 (`handlers.run_infer`). Errors are the same ServingError tree, rendered as OIP's
`{"error": message}` with Content-Type application/json.

Event loop only; no torch. app.py hands every /v2 path here; `dispatch` reads the rest.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server.errors import (
    ErrorCode,
    MethodNotAllowed,
    NotFound,
    ServingError,
    Unauthorized,
    error_for_code,
)
from server.http import handlers
from server.http.incoming import Incoming
from server.http.state import Endpoint, Phase, ServerState
from server.protocol.oip import Framing, decode_infer_request
from server.protocol.oip_response import (
    VERSION,
    dumps,
    encode_infer_response,
    error_body,
    model_config,
    model_metadata,
    model_stats,
    server_metadata,
)

log = logging.getLogger(__name__)
JSON_TYPE = "application/json"
HEADER_LENGTH = "Inference-Header-Content-Length"
_READ_METHODS = frozenset(("GET", "HEAD"))
_MODEL_ACTIONS = frozenset(("ready", "config", "stats", "infer"))


@dataclass(frozen=True)
class Route:
    action: str  # server | live | ready | models_stats | model | ready | config | stats | infer
    model: str = ""
    version: str | None = None


def parse_route(path: str) -> Route | None:
    """The OIP route of a /v2 path, or None when there is none:
    /v2, /v2/health/{live,ready}, /v2/models/stats and
    /v2/models/{m}[/versions/{v}][/ready|/config|/stats|/infer]."""
    parts = path.split("/")[2:]  # "", "v2", ...
    if not parts:
        return Route("server")
    if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
        return Route("health_" + parts[1])
    if parts[0] != "models" or len(parts) < 2 or not parts[1]:
        return None
    if parts[1:] == ["stats"]:  # Triton's "all models" (so no model can be called "stats")
        return Route("models_stats")
    model, rest, version = parts[1], parts[2:], None
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not rest[1]:
            return None
        version, rest = rest[1], rest[2:]
    if not rest:
        return Route("model", model, version)
    if len(rest) == 1 and rest[0] in _MODEL_ACTIONS:
        return Route(rest[0], model, version)
    return None


async def dispatch(state: ServerState, request: Incoming) -> web.Response:
    route = parse_route(request.path)
    if route is None:
        return error_response(NotFound(f"no such endpoint: {request.method} {request.path}"))
    if route.action == "infer":
        if request.method != "POST":
            return _method_not_allowed(request, "POST")
        return await infer(state, request, route)
    if request.method not in _READ_METHODS:
        return _method_not_allowed(request, "GET")
    try:
        return await _READERS[route.action](state, route)
    except ServingError as error:
        return error_response(error)


def error_response(error: ServingError, headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return web.Response(
        status=error.http_status,
        body=error_body(error.message),
        content_type=JSON_TYPE,
        headers=headers,
    )


def unauthorized(request: Incoming) -> web.Response:
    error = Unauthorized("this server needs a bearer token: Authorization: Bearer <token>")
    return error_response(error, {"WWW-Authenticate": 'Bearer realm="microbatch"'})


def _method_not_allowed(request: Incoming, allowed: str) -> web.Response:
    error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}")
    return error_response(error, {"Allow": allowed})


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(body), content_type=JSON_TYPE)


async def infer(state: ServerState, request: Incoming, route: Route) -> web.Response:
    started = state.clock.now()
    model = route.model
    try:
        endpoint = _endpoint(state, route)
        framing = Framing(
            header_length=request.headers.get(HEADER_LENGTH),
            content_encoding=request.headers.get("Content-Encoding"),
            output_names=tuple(s.name for s in endpoint.info.outputs),
        )
        result, decoded = await handlers.run_infer(
            state, request, model, started, decode_infer_request, framing, batch_dim_required=True
        )
        parameters = {
            "batch_size": result.batch_size,
            "device": result.device,
            "queue_ms": result.queue_ms,
            "compute_ms": result.compute_ms,
        }
        body, header_length = encode_infer_response(model, result.outputs, decoded, parameters)
    except ServingError as error:
        state.metrics.request_done(model, error.code.value, state.clock.now() - started)
        return error_response(error)
    except Exception:  # the one place an unexpected error on /v2 becomes a 500, logged once
        log.exception("unhandled error serving model %r over /v2", model)
        state.metrics.request_done(model, ErrorCode.INTERNAL.value, state.clock.now() - started)
        return error_response(
            error_for_code(ErrorCode.INTERNAL.value, "internal error (logged on the server)")
        )
    state.metrics.request_done(model, "ok", state.clock.now() - started)
    if header_length is None:
        return web.Response(body=body, content_type=JSON_TYPE)
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )


def _endpoint(state: ServerState, route: Route) -> Endpoint:
    """The served model a route names (404 for an unknown model or version)."""
    endpoint = state.endpoints.get(route.model)
    if endpoint is None:
        raise handlers.unknown_model(state, route.model)
    if route.version is not None and route.version != VERSION:
        raise NotFound(
            f"model {route.model!r} has no version {route.version!r}; its only version is "
            f"{VERSION!r}"
        )
    return endpoint


async def _server(state: ServerState, route: Route) -> web.Response:
    try:
        version = importlib.metadata.version("microbatch")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return _json(server_metadata(version))


async def _live(state: ServerState, route: Route) -> web.Response:
    return _json({"live": True})


async def _ready(state: ServerState, route: Route) -> web.Response:
    status, body = handlers.readiness(state)
    if status == 200:
        return _json({"ready": True})
    why = "; ".join(body.get("unavailable", {}).values()) or f"the server is {state.phase.value}"
    return _json({"ready": False, "error": why}, status=503)


async def _model_ready(state: ServerState, route: Route) -> web.Response:
    _endpoint(state, route)
    why = f"the server is {state.phase.value}"
    if state.phase is Phase.READY:
        unavailable = state.devices.unavailable(route.model) if state.devices else None
        if unavailable is None:
            return _json({"name": route.model, "ready": True})
        why = unavailable
    error = f"model {route.model!r} is not ready: {why}"
    return _json({"name": route.model, "ready": False, "error": error}, status=503)


def _format(state: ServerState, model: str) -> str:
    return next((m.format for m in state.config.models if m.name == model), "")


async def _model(state: ServerState, route: Route) -> web.Response:
    info = _endpoint(state, route).info
    return _json(model_metadata(info, _format(state, route.model)))


async def _config(state: ServerState, route: Route) -> web.Response:
    info = _endpoint(state, route).info
    workers = state.pool.live_workers() if state.pool is not None else 0
    return _json(model_config(info, _format(state, route.model), workers))


async def _stats(state: ServerState, route: Route) -> web.Response:
    _endpoint(state, route)
    stats = model_stats(route.model, state.metrics.model_totals(route.model))
    return _json({"model_stats": [stats]})


async def _all_stats(state: ServerState, route: Route) -> web.Response:
    stats = [model_stats(m, state.metrics.model_totals(m)) for m in state.endpoints]
    return _json({"model_stats": stats})


_READERS: dict[str, Callable[[ServerState, Route], Awaitable[web.Response]]] = {
    "server": _server,
    "health_live": _live,
    "health_ready": _ready,
    "models_stats": _all_stats,
    "model": _model,
    "ready": _model_ready,
    "config": _config,
    "stats": _stats,
}
