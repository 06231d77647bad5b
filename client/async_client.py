"""AsyncClient: predict, predict_many, models, ready and health over one pooled session.

Runs on the caller's event loop (the one that first uses it; the sync Client gives it a private
loop in a thread). Imports neither torch nor aiohttp.web.
"""

from __future__ import annotations

import asyncio
import functools
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import numpy as np

from client.call import Deadline, Retrying, send
from client.endpoints import Endpoints, Resolver, system_resolver
from client.inputs import Inputs, batch_form, join, named_inputs, split
from client.model_info import ModelInfo, parse_listing
from client.prediction import Prediction, RequestInfo
from client.probe import probe
from client.retry import RetryPolicy
from client.transport import Address, Transport
from client.wire import (
    ACCEPT_MSGPACK,
    MSGPACK_HEADERS,
    decode_body,
    decode_infer,
    encode_inputs,
    infer_body,
)

T = TypeVar("T")
_Outputs = tuple[dict[str, np.ndarray], RequestInfo]


class AsyncClient:
    """A client of microbatch servers; use it as `async with AsyncClient(url) as client:`.

    `url` is http://host:port or unix:///path/to.sock, or a list of them: each request then goes
    to the endpoint with fewer requests outstanding of two drawn at random, and one that refuses
    connections or answers 503 shutting_down or not_ready sits out for a while (client/balance.py).
    With `resolve_every_s`, each URL's host name stands for all of its addresses, resolved
    (by `resolver`, default the system's) on first use and again every `resolve_every_s`
    seconds: a Kubernetes headless Service's pods, for instance. `timeout_s` is the default
    time a call may take, retries and split parts included (each call may pass its own).
    `retry` sets how 503s and refused connections are retried; None turns retries off. At
    most `max_connections` requests are in flight at once (over TCP; as many again per Unix
    socket), on reused keep-alive connections. `token`: the server's bearer token
    (server.auth_token), sent with every request.
    """

    def __init__(
        self,
        url: str | Sequence[str] = "http://127.0.0.1:8000",
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, so safely shared
        max_connections: int = 64,
        resolve_every_s: float | None = None,
        resolver: Resolver = system_resolver,
        token: str | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.url = url
        self.timeout_s = timeout_s
        urls = [url] if isinstance(url, str) else list(url)
        self._endpoints = Endpoints(
            [Address.parse(u) for u in urls], resolve_every_s=resolve_every_s, resolver=resolver
        )
        self._transport = Transport(max_connections, token)
        self._retrying = Retrying(retry, random.Random())
        self._max_connections = max_connections
        self._listing: dict[str, ModelInfo] | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pooled connections; the client cannot be used afterwards."""
        self._endpoints.close()
        await self._transport.close()

    async def health(self, *, timeout_s: float | None = None) -> bool:
        """True when the server process answers /healthz; False when nothing listens there.
        With several endpoints, True when any of them does.

        Probes are never retried; a server that does not answer in time raises Timeout.
        """
        return await self._probe("/healthz", timeout_s)

    async def ready(self, *, timeout_s: float | None = None) -> bool:
        """True when the server takes requests now (/readyz 200); False while it starts or
        drains (503) and when nothing listens. With several endpoints, True when any of them
        takes requests. Never retried; no answer in time is a Timeout."""
        return await self._probe("/readyz", timeout_s)

    async def _probe(self, path: str, timeout_s: float | None) -> bool:
        deadline = Deadline.after(self.timeout_s if timeout_s is None else timeout_s)
        endpoints = await self._endpoints.current()
        return await probe(self._transport, endpoints, path, deadline, self._retrying.rng)

    async def models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """The served models (specs and batching), fetched now; also refreshes the cache that
        predict uses to split large inputs."""
        return list(
            (
                await self._fetch_listing(
                    Deadline.after(self.timeout_s if timeout_s is None else timeout_s)
                )
            ).values()
        )

    async def _fetch_listing(self, deadline: Deadline) -> dict[str, ModelInfo]:
        reply = await send(
            self._transport,
            self._endpoints,
            "GET",
            "/v1/models",
            _no_body,
            ACCEPT_MSGPACK,
            deadline,
            self._retrying,
        )
        self._listing = parse_listing(decode_body(reply.body, reply.content_type, "/v1/models"))
        return self._listing

    async def _model_info(self, model: str, deadline: Deadline) -> ModelInfo | None:
        """The model's entry, read once and cached; refetched when a name is not in it."""
        if self._listing is None or model not in self._listing:
            await self._fetch_listing(deadline)
        assert self._listing is not None
        return self._listing.get(model)

    @overload
    async def predict(
        self,
        model: str,
        x: np.ndarray,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        return_info: Literal[False] = False,
    ) -> np.ndarray: ...

    @overload
    async def predict(
        self,
        model: str,
        x: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        return_info: Literal[False] = False,
    ) -> dict[str, np.ndarray]: ...

    @overload
    async def predict(
        self,
        model: str,
        x: Inputs,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        return_info: Literal[True],
    ) -> Prediction: ...

    async def predict(
        self,
        model: str,
        x: Inputs,
        *,
        timeout_s: float | None = None,
        request_id: str | None = None,
        return_info: bool = False,
    ) -> np.ndarray | dict[str, np.ndarray] | Prediction:
        """Run `model` on one sample or n samples.

        `x` is one array for a single-input model, the answer then the single output's array;
        or a map of input name to array, the answer then a map of output name to array (use
        this form for models with several inputs or outputs). Samples beyond the model's
        max_batch_size are split into requests that run concurrently, joined in order.
        `return_info=True` returns a Prediction: the outputs and the server's timing report.
        `request_id` is sent with the request and checked in the answer (default: a random one).
        """
        return await self._predict_shaped(model, x, timeout_s, request_id, return_info)

    async def _predict_shaped(
        self,
        model: str,
        x: Inputs,
        timeout_s: float | None,
        request_id: str | None,
        return_info: bool,
    ) -> np.ndarray | dict[str, np.ndarray] | Prediction:
        deadline = Deadline.after(self.timeout_s if timeout_s is None else timeout_s)
        one_output = not return_info and not isinstance(x, Mapping)
        prediction = await self._predict(model, x, deadline, request_id, one_output)
        if return_info:
            return prediction
        if isinstance(x, Mapping):
            return prediction.outputs
        if len(prediction.outputs) != 1:
            raise TypeError(_several_outputs(model, list(prediction.outputs)))
        return prediction.output

    async def _predict(
        self,
        model: str,
        x: Inputs,
        deadline: Deadline,
        request_id: str | None,
        one_output: bool,
    ) -> Prediction:
        """`one_output`: the caller wants a bare array, so a multi-output model is refused early."""
        inputs = named_inputs(x)
        info = await self._model_info(model, deadline)
        parts = [inputs]
        if info is not None and info.inputs:  # not listed or not loaded: the server decides
            if one_output and len(info.outputs) > 1:
                raise TypeError(_several_outputs(model, [s.name for s in info.outputs]))
            batched, samples, single, _ = batch_form(info, inputs)
            if not single and samples > info.max_batch_size:
                parts = split(batched, samples, info.max_batch_size)
        base_id = request_id or uuid.uuid4().hex
        ids = [base_id] if len(parts) == 1 else [f"{base_id}.{i}" for i in range(len(parts))]
        results = await _gather_bounded(
            [
                functools.partial(self._infer_once, model, part, rid, deadline)
                for part, rid in zip(parts, ids, strict=True)
            ],
            self._max_connections,
        )
        if len(results) == 1:
            return Prediction(results[0][0], (results[0][1],))
        return Prediction(join([r[0] for r in results]), tuple(r[1] for r in results))

    async def _infer_once(
        self, model: str, inputs: dict[str, np.ndarray], request_id: str, deadline: Deadline
    ) -> _Outputs:
        tensors = encode_inputs(inputs)
        reply = await send(
            self._transport,
            self._endpoints,
            "POST",
            f"/v1/models/{model}/infer",
            lambda remaining_s: infer_body(tensors, request_id, remaining_s * 1000.0),
            MSGPACK_HEADERS,
            deadline,
            self._retrying,
        )
        return decode_infer(reply.body, reply.content_type, request_id)

    @overload
    async def predict_many(
        self,
        model: str,
        arrays: Iterable[np.ndarray],
        *,
        concurrency: int = 8,
        timeout_s: float | None = None,
        return_info: Literal[False] = False,
    ) -> list[np.ndarray]: ...

    @overload
    async def predict_many(
        self,
        model: str,
        arrays: Iterable[Mapping[str, np.ndarray]],
        *,
        concurrency: int = 8,
        timeout_s: float | None = None,
        return_info: Literal[False] = False,
    ) -> list[dict[str, np.ndarray]]: ...

    @overload
    async def predict_many(
        self,
        model: str,
        arrays: Iterable[Inputs],
        *,
        concurrency: int = 8,
        timeout_s: float | None = None,
        return_info: Literal[True],
    ) -> list[Prediction]: ...

    async def predict_many(
        self,
        model: str,
        arrays: Iterable[Inputs],
        *,
        concurrency: int = 8,
        timeout_s: float | None = None,
        return_info: bool = False,
    ) -> list[np.ndarray] | list[dict[str, np.ndarray]] | list[Prediction]:
        """predict() on each item as an independent request, at most `concurrency` in flight;
        the answers in input order. `timeout_s` applies to each item from when it starts. The
        first failure is raised and the requests still running are cancelled."""
        return await self._predict_many_shaped(model, arrays, concurrency, timeout_s, return_info)

    async def _predict_many_shaped(
        self,
        model: str,
        arrays: Iterable[Inputs],
        concurrency: int,
        timeout_s: float | None,
        return_info: bool,
    ) -> list[Any]:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        calls = [
            functools.partial(self._predict_shaped, model, item, timeout_s, None, return_info)
            for item in arrays
        ]
        # Each item is shaped as its own predict() call would shape it.
        return await _gather_bounded(calls, concurrency)


def _several_outputs(model: str, names: Sequence[str]) -> str:
    return (
        f"model {model!r} has {len(names)} outputs ({', '.join(names)}); pass the inputs as a "
        "map {name: array} to get a map of outputs, or use return_info=True"
    )


def _no_body(remaining_s: float) -> None:
    return None


async def _gather_bounded(calls: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Await every call with at most `limit` running at once; results in the calls' order.

    A failure cancels the calls still running and is raised (Python 3.10 has no TaskGroup).
    """
    if len(calls) == 1:
        return [await calls[0]()]
    results: dict[int, T] = {}
    indexes = iter(range(len(calls)))

    async def worker() -> None:
        for i in indexes:  # shared: each index is taken by exactly one worker
            results[i] = await calls[i]()

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(calls)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [results[i] for i in range(len(calls))]
