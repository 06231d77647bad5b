"""HTTP handlers: decode, validate, queue, await the batch, encode. Errors become responses in
one place (`error_response`), in the request's own encoding.

Event loop only; no torch. The infer handler is the hot path. Each handler takes the server
state and aiohttp's low-level request; app.py maps paths to them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11

from server.batching.pending import PendingRequest, RequestResult
from server.errors import (
    ErrorCode,
    NotReady,
    PayloadTooLarge,
    ServingError,
    ShuttingDown,
    UnknownModel,
    error_for_code,
)
from server.http.state import Phase, ServerState
from server.models.matching import match_inputs
from server.protocol.codec import (
    CONTENT_TYPE_OF,
    JSON,
    MSGPACK,
    decode_request,
    encode,
    encode_tensor,
    encoding_of,
    error_body,
)

log = logging.getLogger(__name__)


def reply_encoding(request: web.BaseRequest) -> str:
    """The request's own encoding where it has one, else what Accept asks for, else JSON."""
    ctype = request.headers.get("Content-Type", "")
    if "msgpack" in ctype:
        return MSGPACK
    if "json" in ctype:
        return JSON
    return MSGPACK if "msgpack" in request.headers.get("Accept", "") else JSON


def error_response(
    error: ServingError, encoding: str, headers: dict[str, str] | None = None
) -> web.Response:
    headers = dict(headers or {})
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return web.Response(
        status=error.http_status,
        body=error_body(error.code.value, error.message, encoding),
        content_type=CONTENT_TYPE_OF[encoding],
        headers=headers,
    )


async def infer(state: ServerState, request: web.BaseRequest, model: str) -> web.Response:
    started = state.clock.now()
    encoding: str | None = None
    try:
        encoding = encoding_of(request.headers.get("Content-Type", ""))
        result, request_id = await _infer(state, request, model, encoding, started)
    except ServingError as error:
        state.metrics.request_done(model, error.code.value, state.clock.now() - started)
        return error_response(error, encoding or reply_encoding(request))
    except Exception:  # the one place an unexpected error becomes a 500, logged once
        log.exception("unhandled error serving model %r", model)
        state.metrics.request_done(model, ErrorCode.INTERNAL.value, state.clock.now() - started)
        internal = error_for_code(ErrorCode.INTERNAL.value, "internal error (logged on the server)")
        return error_response(internal, encoding or reply_encoding(request))
    body = {
        "outputs": {name: encode_tensor(arr, encoding) for name, arr in result.outputs.items()},
        "id": request_id,
        "model": model,
        "batch_size": result.batch_size,
        "device": result.device,
        "queue_ms": result.queue_ms,
        "compute_ms": result.compute_ms,
    }
    response = web.Response(body=encode(body, encoding), content_type=CONTENT_TYPE_OF[encoding])
    state.metrics.request_done(model, "ok", state.clock.now() - started)
    return response


async def _infer(
    state: ServerState, request: web.BaseRequest, model: str, encoding: str, started: float
) -> tuple[RequestResult, str | None]:
    endpoint = state.endpoints.get(model)
    if endpoint is None:
        raise _unknown_model(state, model)
    if state.phase is not Phase.READY:
        raise _not_serving(state)
    # Shed before the body is read or decoded, so that refusing costs next to nothing.
    endpoint.queue.refuse_early()
    if "Expect" in request.headers:
        await _continue(request)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"body exceeds server.max_body_bytes ({state.config.server.max_body_bytes} bytes)"
        ) from None
    decoded = decode_request(body, encoding, state.limits)
    info = endpoint.info
    inputs, samples, single = match_inputs(
        model, info.inputs, decoded.inputs, info.batching.max_batch_size
    )
    timeout_ms = decoded.timeout_ms or info.batching.timeout_ms
    future = endpoint.queue.new_future()
    endpoint.queue.submit(
        PendingRequest(
            inputs, samples, single, started, started + timeout_ms / 1000.0, future, decoded.id
        )
    )
    return await future, decoded.id


async def _continue(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` (curl sends it for bodies over 1 MiB, then waits a second
    for this), once the checks that need no body have passed: a refused client never sends
    its body. aiohttp's low-level server leaves this to the handler."""
    if (
        request.version == HttpVersion11
        and request.headers["Expect"].lower() == "100-continue"
        and request.writer is not None
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response


def _unknown_model(state: ServerState, model: str) -> ServingError:
    why = state.missing.get(model)
    if why is not None:
        return UnknownModel(f"model {model!r} is not served: it failed to load ({why})")
    return UnknownModel(f"no model named {model!r}; served models: {sorted(state.endpoints)}")


def _not_serving(state: ServerState) -> ServingError:
    if state.phase is Phase.DRAINING:
        return ShuttingDown("the server is shutting down and takes no new requests")
    return NotReady(f"the server is {state.phase.value}; retry when /readyz answers 200")


async def list_models(state: ServerState, request: web.BaseRequest) -> web.Response:
    pool = state.pool
    devices = state.devices
    models: list[dict[str, Any]] = []
    for cfg in state.config.models:
        endpoint = state.endpoints.get(cfg.name)
        batching = endpoint.info.batching if endpoint else cfg.batching
        models.append(
            {
                "name": cfg.name,
                "format": cfg.format,
                "path": cfg.path,
                "ready": endpoint is not None,
                "inputs": [s.to_wire() for s in endpoint.info.inputs] if endpoint else [],
                "outputs": [s.to_wire() for s in endpoint.info.outputs] if endpoint else [],
                "batching": {
                    "max_batch_size": batching.max_batch_size,
                    "max_delay_ms": batching.max_delay_ms,
                    "max_queue_size": batching.max_queue_size,
                    "timeout_ms": batching.timeout_ms,
                },
                "routing": cfg.placement.routing,
                # devices (where its batches may run), costs (calibrated and current), crossover
                **(devices.describe(cfg.name) if devices else {"devices": ["cpu"]}),
                "queued_samples": endpoint.queue.queued_samples if endpoint else 0,
            }
        )
    executors = []
    if pool is not None:
        executors.append(
            {
                "device": pool.device,
                "workers": pool.live_workers(),
                "busy_workers": pool.busy_workers(),
                "pids": pool.worker_pids(),
            }
        )
    for gpu in devices.gpus if devices else []:
        executors.append(
            {
                "device": gpu.device,
                "name": gpu.gpu_name,
                "alive": gpu.alive(),
                "in_flight_batches": gpu.in_flight(),
                "batch_caps": dict(gpu.caps),
            }
        )
    return _plain(request, {"models": models, "executors": executors})


async def healthz(state: ServerState, request: web.BaseRequest) -> web.Response:
    return _plain(request, {"status": "alive"})


async def readyz(state: ServerState, request: web.BaseRequest) -> web.Response:
    # A stop signal came: not ready at once, though server.drain_delay_s may keep it serving.
    body: dict[str, Any] = {"status": (Phase.DRAINING if state.stopping else state.phase).value}
    if state.failure:
        body["reason"] = state.failure
    if state.missing:  # server.on_model_failure = serve_others: ready, without these
        body["missing"] = state.missing
    ready = state.phase is Phase.READY and not state.stopping
    return _plain(request, body, status=200 if ready else 503)


async def metrics(state: ServerState, request: web.BaseRequest) -> web.Response:
    text = state.metrics.render()
    return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4"})


def _plain(request: web.BaseRequest, body: Any, status: int = 200) -> web.Response:
    encoding = reply_encoding(request)
    return web.Response(
        status=status, body=encode(body, encoding), content_type=CONTENT_TYPE_OF[encoding]
    )


def method_not_allowed(request: web.BaseRequest, allowed: str) -> web.Response:
    error = error_for_code(
        ErrorCode.METHOD_NOT_ALLOWED.value,
        f"{request.method} is not allowed on {request.path}; use {allowed}",
    )
    return error_response(error, reply_encoding(request), {"Allow": allowed})


def not_found(request: web.BaseRequest) -> web.Response:
    error = error_for_code(
        ErrorCode.NOT_FOUND.value, f"no such endpoint: {request.method} {request.path}"
    )
    return error_response(error, reply_encoding(request))
