"""HTTP handlers: decode, validate, queue, await the batch, encode. Errors become responses in
one place (`error_response`), in the request's own encoding.

Event loop only; no torch. The infer handler is the hot path; `run_infer`, its protocol-free
part, also serves /v2 (oip_handlers.py). Each handler takes the server state and a request
(aiohttp's low-level one, or a buffered one from another front: incoming.py); app.py maps
paths to them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np
from aiohttp import web
from aiohttp.http import HttpVersion11

from server.batching.pending import PendingRequest, RequestResult
from server.errors import (
    BadRequest,
    ErrorCode,
    ExpectationFailed,
    NotReady,
    PayloadTooLarge,
    ServingError,
    ShuttingDown,
    UnknownModel,
    error_for_code,
)
from server.http.incoming import Incoming
from server.http.model_listing import describe_executors, describe_routing
from server.http.state import Phase, ServerState
from server.models.matching import DeclaredShapes, match_inputs
from server.models.spec import TensorSpec, is_dynamic, sent
from server.protocol.codec import (
    CONTENT_TYPE_OF,
    JSON,
    MSGPACK,
    InferRequest,
    Limits,
    decode_request,
    encode,
    encode_tensor,
    encoding_of,
    error_body,
)

log = logging.getLogger(__name__)


class Decoded(Protocol):
    """What a protocol's request decoder hands to `run_infer` (/v1's InferRequest, /v2's)."""

    @property
    def inputs(self) -> dict[str, np.ndarray]: ...
    @property
    def id(self) -> str | None: ...
    @property
    def timeout_ms(self) -> float | None: ...


D = TypeVar("D", bound=Decoded)
C = TypeVar("C")


def reply_encoding(request: Incoming) -> str:
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


async def infer(state: ServerState, request: Incoming, model: str) -> web.Response:
    started = state.clock.now()
    encoding: str | None = None
    try:
        encoding = encoding_of(request.headers.get("Content-Type", ""))
        body = await _infer_v1(state, request, model, started, encoding)
    except ServingError as error:
        state.metrics.request_done(model, error.code.value, state.clock.now() - started)
        return error_response(error, encoding or reply_encoding(request))
    except Exception:  # the one place an unexpected error becomes a 500, logged once
        log.exception("unhandled error serving model %r", model)
        state.metrics.request_done(model, ErrorCode.INTERNAL.value, state.clock.now() - started)
        internal = error_for_code(ErrorCode.INTERNAL.value, "internal error (logged on the server)")
        return error_response(internal, encoding or reply_encoding(request))
    response = web.Response(body=body, content_type=CONTENT_TYPE_OF[encoding])
    state.metrics.request_done(model, "ok", state.clock.now() - started)
    return response


async def _infer_v1(
    state: ServerState, request: Incoming, model: str, started: float, encoding: str
) -> bytes:
    """A /v1 request to its encoded answer."""
    shapes = None
    if encoding == JSON:  # JSON bodies are costly to parse: a wrong shape is refused first
        endpoint = state.endpoints.get(model)
        shapes = DeclaredShapes(model, endpoint.info.inputs) if endpoint else None
    result, decoded = await run_infer(
        state,
        request,
        model,
        started,
        _decode_v1,
        (encoding, shapes),
        max_body_bytes=state.limits.max_json_bytes if encoding == JSON else None,
    )
    body = {
        "outputs": {name: encode_tensor(arr, encoding) for name, arr in result.outputs.items()},
        "id": decoded.id,
        "model": model,
        "batch_size": result.batch_size,
        "device": result.device,
        "queue_ms": result.queue_ms,
        "compute_ms": result.compute_ms,
    }
    return encode(body, encoding)


def _decode_v1(
    body: bytes, context: tuple[str, DeclaredShapes | None], limits: Limits
) -> InferRequest:
    return decode_request(body, context[0], limits, context[1])


async def run_infer(
    state: ServerState,
    request: Incoming,
    model: str,
    started: float,
    decode: Callable[[bytes, C, Limits], D],
    context: C,
    *,
    batch_dim_required: bool = False,
    max_body_bytes: int | None = None,
) -> tuple[RequestResult, D]:
    """One request of either protocol through the same checks, admission, limits and queue:
    `decode(body, context, limits)` is the protocol's own part. `batch_dim_required`: every
    tensor must carry the batch dimension first (OIP), so no shape is read as one sample.
    `max_body_bytes`: a limit below server.max_body_bytes for this body (JSON), checked against
    Content-Length before a byte is read (the decoder checks what was read)."""
    endpoint = state.endpoints.get(model)
    if state.phase is not Phase.READY and (endpoint is not None or _configured(state, model)):
        raise _not_serving(state)  # a model still loading is not unknown: 503, retry
    if endpoint is None:
        raise unknown_model(state, model)
    # Shed before the body is read or decoded, so that refusing costs next to nothing.
    endpoint.queue.refuse_early()
    if max_body_bytes is not None and (request.content_length or 0) > max_body_bytes:
        raise PayloadTooLarge(
            f"a JSON body of {request.content_length} bytes exceeds server.max_json_body_bytes "
            f"({max_body_bytes}); send large tensors in msgpack"
        )
    if "Expect" in request.headers:
        await _continue(request)
    # Read within server.max_body_bytes, max_decompressed_bytes and body_timeout_s
    # (request_body.py): over a limit is a 413, a corrupt or stalled body a 400.
    body = await request.read()
    decoded = decode(body, context, state.limits)
    info = endpoint.info
    batching = info.batching
    inputs, samples, single, length = match_inputs(
        model, info.sent_inputs, decoded.inputs, batching.max_batch_size, batching.max_length
    )
    if single and batch_dim_required:
        raise _batch_dim_missing(model, endpoint.info.inputs)
    timeout_ms = decoded.timeout_ms or batching.timeout_ms
    future = endpoint.queue.new_future()
    endpoint.queue.submit(
        PendingRequest(
            inputs,
            samples,
            single,
            started,
            started + timeout_ms / 1000.0,
            future,
            decoded.id,
            length=length,
        )
    )
    return await future, decoded


def _batch_dim_missing(model: str, specs: tuple[TensorSpec, ...]) -> BadRequest:
    takes = ", ".join(f"{s.name} {[-1, *s.shape]}" for s in sent(specs))
    return BadRequest(
        f"tensors carry the batch dimension first: model {model!r} takes {takes}; "
        "send shape [1, ...] for one sample"
    )


async def _continue(request: Incoming) -> None:
    """Answer `Expect: 100-continue` (curl sends it for bodies over 1 MiB, then waits a second
    for this), once the checks that need no body have passed: a refused client never sends
    its body. aiohttp's low-level server leaves this to the handler. Any other expectation is
    one this server cannot meet: 417 (RFC 9110, 10.1.1). A request from another front
    (incoming.BufferedRequest) came whole: its front answered the expectation."""
    expect = request.headers["Expect"]
    if expect.lower() != "100-continue":
        raise ExpectationFailed(f"Expect: {expect[:64]!r} cannot be met; only 100-continue can")
    if not isinstance(request, web.BaseRequest):
        return
    if request.version == HttpVersion11 and request.writer is not None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response


def unknown_model(state: ServerState, model: str) -> ServingError:
    why = state.missing.get(model)
    if why is not None:
        return UnknownModel(f"model {model!r} is not served: it failed to load ({why})")
    return UnknownModel(f"no model named {model!r}; served models: {sorted(state.endpoints)}")


def _configured(state: ServerState, model: str) -> bool:
    """A model the config names and that has not failed to load (it may still be loading)."""
    return model not in state.missing and any(m.name == model for m in state.config.models)


def _not_serving(state: ServerState) -> ServingError:
    if state.phase is Phase.DRAINING:
        return ShuttingDown("the server is shutting down and takes no new requests")
    return NotReady(f"the server is {state.phase.value}; retry when /readyz answers 200")


async def list_models(state: ServerState, request: Incoming) -> web.Response:
    devices = state.devices
    unavailable = _unavailable(state)
    models: list[dict[str, Any]] = []
    for cfg in state.config.models:
        endpoint = state.endpoints.get(cfg.name)
        batching = endpoint.info.batching if endpoint else cfg.batching
        dynamic = endpoint is not None and is_dynamic(endpoint.info.inputs)
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
                    # A model with a dynamic dimension (-1): the longest request it takes.
                    **({"max_length": batching.max_length} if dynamic else {}),
                },
                **({"length_aware": batching.length_aware} if dynamic else {}),
                "routing": cfg.placement.routing,
                # Whether some executor can run its batches now (none: every worker restarting
                # or stuck in a batch), and why not.
                "available": endpoint is not None and unavailable.get(cfg.name) is None,
                "unavailable": unavailable.get(cfg.name),
                # devices (where its batches may run), costs (calibrated and current), crossover
                **(describe_routing(devices, cfg.name) if devices else {"devices": ["cpu"]}),
                "queued_samples": endpoint.queue.queued_samples if endpoint else 0,
            }
        )
    executors = describe_executors(state.pool, devices)
    return _plain(request, {"models": models, "executors": executors})


async def healthz(state: ServerState, request: Incoming) -> web.Response:
    return _plain(request, {"status": "alive"})


async def readyz(state: ServerState, request: Incoming) -> web.Response:
    status, body = readiness(state)
    return _plain(request, body, status=status)


def readiness(state: ServerState) -> tuple[int, dict[str, Any]]:
    """/readyz's status code and body: 200 only when serving and every model can be run."""
    # A stop signal came: not ready at once, though server.drain_delay_s may keep it serving.
    body: dict[str, Any] = {"status": (Phase.DRAINING if state.stopping else state.phase).value}
    if state.failure:
        body["reason"] = state.failure
    if state.missing:  # server.on_model_failure = serve_others: ready, without these
        body["missing"] = state.missing
    ready = state.phase is Phase.READY and not state.stopping
    unavailable = _unavailable(state) if ready else {}
    if unavailable:  # no worker can run these now: a load balancer should look elsewhere
        body["status"], body["unavailable"] = "unavailable", unavailable
    return (200 if ready and not unavailable else 503), body


def _unavailable(state: ServerState) -> dict[str, str]:
    """Served models that no executor can run now, with why."""
    devices = state.devices
    if devices is None or state.phase is not Phase.READY:
        return {}
    reasons = {name: devices.unavailable(name) for name in state.endpoints}
    return {name: why for name, why in reasons.items() if why is not None}


def readiness_probe(state: ServerState, request: Incoming) -> web.Response:
    """/readyz asked without a token where one is needed: the status code and phase only."""
    status, body = readiness(state)
    return _plain(request, {"status": body["status"]}, status=status)


async def metrics(state: ServerState, request: Incoming) -> web.Response:
    text = state.metrics.render()
    return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4"})


def _plain(request: Incoming, body: Any, status: int = 200) -> web.Response:
    encoding = reply_encoding(request)
    return web.Response(
        status=status, body=encode(body, encoding), content_type=CONTENT_TYPE_OF[encoding]
    )


def method_not_allowed(request: Incoming, allowed: str) -> web.Response:
    error = error_for_code(
        ErrorCode.METHOD_NOT_ALLOWED.value,
        f"{request.method} is not allowed on {request.path}; use {allowed}",
    )
    return error_response(error, reply_encoding(request), {"Allow": allowed})


def not_found(request: Incoming) -> web.Response:
    error = error_for_code(
        ErrorCode.NOT_FOUND.value, f"no such endpoint: {request.method} {request.path}"
    )
    return error_response(error, reply_encoding(request))
