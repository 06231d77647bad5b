"""The client against a stand-in server: error codes, retries and Retry-After, timeouts, request
ids, keep-alive reuse and the concurrency bound of predict_many.

The stand-in is a real aiohttp.web server on 127.0.0.1 port 0 (or a Unix socket) in its own
loop thread, scripted per test; it replaces the *server*, never the client under test. Waits
are conditions with bounded timeouts; the one duration asserted is the server's Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from aiohttp import web

import client
from client import AsyncClient, Client, RetryPolicy
from server.errors import ErrorCode, error_for_code

FAST_RETRY = RetryPolicy(max_retries=3, backoff_initial_s=0.001, backoff_max_s=0.01)
Handler = Callable[["Double", dict[str, Any]], Awaitable[web.StreamResponse]]


@dataclass
class Hit:
    at: float  # time.monotonic() on arrival
    peer: Any  # the client's end of the connection (one per keep-alive connection)
    body: dict[str, Any]
    host: str = ""  # the request's Host header


@dataclass
class Double:
    """A scripted server: /v1/models lists `echo` (float32[2] in and out) and `twin` (the same
    with two outputs); infer runs `handler`."""

    handler: Handler
    max_batch_size: int = 64
    uds: str | None = None
    hits: list[Hit] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    release: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _port: int = 0

    @property
    def url(self) -> str:
        return f"unix://{self.uds}" if self.uds else f"http://127.0.0.1:{self._port}"

    def __enter__(self) -> Double:
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10), "stand-in server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self, started: threading.Event) -> None:
        self._loop = loop = asyncio.new_event_loop()
        loop.run_until_complete(self._start())
        started.set()
        loop.run_forever()
        assert self._runner is not None
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    async def _start(self) -> None:
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/healthz", self._alive)
        app.router.add_get("/readyz", self._alive)
        app.router.add_post("/v1/models/{model}/infer", self._infer)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        site: web.BaseSite
        if self.uds:
            site = web.UnixSite(self._runner, self.uds)
        else:
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        if not self.uds:
            self._port = self._runner.addresses[0][1]

    async def _alive(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def _models(self, request: web.Request) -> web.Response:
        spec = {"name": "input", "dtype": "float32", "shape": [2]}
        out = {"name": "output", "dtype": "float32", "shape": [2]}
        pair = [{**out, "name": "left"}, {**out, "name": "right"}]
        batching = {"max_batch_size": self.max_batch_size, "max_delay_ms": 1.0}
        models = [
            {"name": "echo", "inputs": [spec], "outputs": [out], "batching": batching},
            {"name": "twin", "inputs": [spec], "outputs": pair, "batching": batching},
        ]
        return web.json_response({"models": models})

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        body = msgpack.unpackb(await request.read())
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.hits.append(Hit(time.monotonic(), peer, body, request.headers.get("Host", "")))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.handler(self, body)
        finally:
            self.in_flight -= 1


def echo(
    body: dict[str, Any], request_id: Any = None, outputs: tuple[str, ...] = ("output",)
) -> web.Response:
    (tensor,) = body["inputs"].values()
    answer = {
        "outputs": dict.fromkeys(outputs, tensor),
        "id": body["id"] if request_id is None else request_id,
        "model": "echo",
        "batch_size": tensor["shape"][0] if len(tensor["shape"]) > 1 else 1,
        "device": "cpu",
        "queue_ms": 0.5,
        "compute_ms": 1.5,
    }
    return web.Response(body=msgpack.packb(answer), content_type="application/msgpack")


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = msgpack.packb({"error": {"code": code, "message": message}})
    return web.Response(
        status=status, body=body, content_type="application/msgpack", headers=headers
    )


async def answer_echo(double: Double, body: dict[str, Any]) -> web.Response:
    return echo(body)


def samples(n: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(2 * n, dtype=np.float32) + start).reshape(n, 2)


@pytest.mark.parametrize("code", [c.value for c in ErrorCode])
def test_every_error_code_raises_its_class(code: str) -> None:
    expected = error_for_code(code, "m")

    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        return error(expected.http_status, code, f"the server says {code}")

    with (
        Double(answer) as double,
        Client(double.url, retry=None) as mb,
        pytest.raises(client.ServerError) as info,
    ):
        mb.predict("echo", samples(1))
    assert type(info.value).__name__ == type(expected).__name__
    assert type(info.value) is client.errors.ERROR_CLASSES[code]
    assert (info.value.code, info.value.message) == (code, f"the server says {code}")
    assert info.value.http_status == expected.http_status
    assert isinstance(info.value, client.MicrobatchError)
    assert not isinstance(info.value, client.TransportError)


def test_unknown_code_and_non_protocol_bodies_map_to_the_base_class() -> None:
    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        if len(double.hits) == 1:
            return error(418, "teapot", "short and stout")
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")

    with Double(answer) as double, Client(double.url, retry=None) as mb:
        with pytest.raises(client.ServerError) as first:
            mb.predict("echo", samples(1))
        with pytest.raises(client.ServerError) as second:
            mb.predict("echo", samples(1))
    assert type(first.value) is client.ServerError
    assert (first.value.code, first.value.message, first.value.http_status) == (
        "teapot",
        "short and stout",
        418,
    )
    assert type(second.value) is client.ServerError
    assert (second.value.code, second.value.http_status) == ("http_502", 502)
    assert "bad gateway" in second.value.message


def test_503_is_retried_and_retry_after_honoured() -> None:
    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        if len(double.hits) == 1:
            return error(503, "overloaded", "queue full", {"Retry-After": "1"})
        if len(double.hits) == 2:
            return error(503, "shutting_down", "draining")
        return echo(body)

    x = samples(3)
    with Double(answer) as double, Client(double.url, retry=FAST_RETRY) as mb:
        y = mb.predict("echo", x, request_id="same-id")
    np.testing.assert_array_equal(y, x)
    assert len(double.hits) == 3
    assert double.hits[1].at - double.hits[0].at >= 1.0  # Retry-After: 1 was honoured
    assert {hit.body["id"] for hit in double.hits} == {"same-id"}  # one request, three tries


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "bad_request"),
        (404, "unknown_model"),
        (500, "model_error"),
        (500, "internal"),
        (504, "deadline_exceeded"),
    ],
)
def test_4xx_500_and_504_are_never_retried(status: int, code: str) -> None:
    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        return error(status, code, "no", {"Retry-After": "0"})

    with (
        Double(answer) as double,
        Client(double.url, retry=FAST_RETRY) as mb,
        pytest.raises(client.errors.ERROR_CLASSES[code]),
    ):
        mb.predict("echo", samples(1))
    assert len(double.hits) == 1


def test_retries_are_bounded_and_off_with_one_setting() -> None:
    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        return error(503, "overloaded", "always full")

    bounded = RetryPolicy(max_retries=2, backoff_initial_s=0.001)
    with Double(answer) as double:
        with Client(double.url, retry=bounded) as mb, pytest.raises(client.Overloaded):
            mb.predict("echo", samples(1))
        assert len(double.hits) == 3
        with Client(double.url, retry=None) as mb, pytest.raises(client.Overloaded):
            mb.predict("echo", samples(1))
        assert len(double.hits) == 4


def test_no_retry_that_would_end_past_the_calls_timeout() -> None:
    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        return error(503, "overloaded", "come back later", {"Retry-After": "30"})

    with Double(answer) as double, Client(double.url, retry=FAST_RETRY) as mb:
        started = time.monotonic()
        with pytest.raises(client.Overloaded) as info:
            mb.predict("echo", samples(1), timeout_s=5.0)
        elapsed = time.monotonic() - started
    assert len(double.hits) == 1
    assert info.value.retry_after_s == 30.0
    assert elapsed < 5.0


def test_refused_connection_is_retried_until_the_server_listens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="client.call")
    path = str(tmp_path / "late.sock")
    policy = RetryPolicy(max_retries=1000, backoff_initial_s=0.01, backoff_max_s=0.05)
    outcome: dict[str, Any] = {}
    with Client(f"unix://{path}", retry=policy, timeout_s=30) as mb:
        call = threading.Thread(target=lambda: outcome.update(y=mb.predict("echo", samples(2))))
        call.start()
        wait_for(lambda: "cannot connect" in caplog.text, "a refused attempt")
        with Double(answer_echo, uds=path):
            call.join(20)
    np.testing.assert_array_equal(outcome["y"], samples(2))


def test_unreachable_server_raises_connect_error_and_is_not_ready() -> None:
    with socket.socket() as sock:  # a port that is certainly closed: bound, never listening
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with Client(url, retry=None) as mb:
            with pytest.raises(client.ConnectError):
                mb.predict("echo", samples(1))
            assert mb.ready() is False
            assert mb.health() is False


@pytest.mark.parametrize("per_call", [True, False])
def test_timeouts_fire(per_call: bool) -> None:
    async def hang(double: Double, body: dict[str, Any]) -> web.Response:
        assert double.release is not None
        await asyncio.wait_for(double.release.wait(), 30)  # cancelled when the client leaves
        return echo(body)

    with Double(hang) as double, Client(double.url, timeout_s=30 if per_call else 0.3) as mb:
        started = time.monotonic()
        with pytest.raises(client.Timeout) as info:
            mb.predict("echo", samples(1), timeout_s=0.3 if per_call else None)
        elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert 0.25 <= elapsed < 5
    assert 0 < double.hits[0].body["timeout_ms"] <= 300  # the deadline travels to the server


def test_async_client_timeout_and_id_mismatch() -> None:
    async def answer(double: Double, body: dict[str, Any]) -> web.StreamResponse:
        if len(double.hits) == 1:
            return echo(body, request_id="someone-else")
        assert double.release is not None
        await asyncio.wait_for(double.release.wait(), 30)
        return echo(body)

    async def scenario(url: str) -> None:
        async with AsyncClient(url, retry=None) as mb:
            with pytest.raises(client.InvalidResponse, match="someone-else"):
                await mb.predict("echo", samples(1), request_id="mine")
            with pytest.raises(client.Timeout):
                await mb.predict("echo", samples(1), timeout_s=0.2)

    with Double(answer) as double:
        asyncio.run(scenario(double.url))
    assert double.hits[0].body["id"] == "mine"


def test_keep_alive_connection_is_reused() -> None:
    with Double(answer_echo) as double, Client(double.url) as mb:
        for i in range(5):
            np.testing.assert_array_equal(mb.predict("echo", samples(1, i)), samples(1, i))
    assert len(double.hits) == 5
    assert len({hit.peer for hit in double.hits}) == 1


def test_predict_many_bounds_concurrency_and_keeps_order() -> None:
    concurrency = 3

    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        # Each answer is held until `concurrency` requests have been in flight together (once),
        # so the bound is both reached and never exceeded, whatever the timing.
        assert double.release is not None
        if double.in_flight >= concurrency:
            double.release.set()
        await asyncio.wait_for(double.release.wait(), 10)
        return echo(body)

    items = [samples(1 + i % 3, 100 * i) for i in range(30)]
    with Double(answer) as double, Client(double.url, retry=None) as mb:
        results = mb.predict_many("echo", items, concurrency=concurrency)
    assert double.max_in_flight == concurrency
    for x, y in zip(items, results, strict=True):
        np.testing.assert_array_equal(y, x)


def test_split_parts_carry_their_own_ids_and_join_in_order() -> None:
    with Double(answer_echo, max_batch_size=4) as double, Client(double.url) as mb:
        x = samples(10)
        p = mb.predict("echo", x, request_id="big", return_info=True)
    np.testing.assert_array_equal(p.output, x)
    assert sorted(hit.body["id"] for hit in double.hits) == ["big.0", "big.1", "big.2"]
    assert [r.request_id for r in p.requests] == ["big.0", "big.1", "big.2"]
    assert sorted(hit.body["inputs"]["input"]["shape"][0] for hit in double.hits) == [2, 4, 4]
    assert (p.device, p.queue_ms, p.compute_ms) == ("cpu", 0.5, 1.5)


def test_split_parts_are_in_flight_together() -> None:
    parts = 3

    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        # Each part is held until all of them are in flight (5 s at most): parts sent one after
        # another would each wait out the bound alone, and the assertion below names the fault.
        assert double.release is not None
        if double.in_flight >= parts:
            double.release.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(double.release.wait(), 5)
        return echo(body)

    x = samples(10)
    with Double(answer, max_batch_size=4) as double, Client(double.url, retry=None) as mb:
        y = mb.predict("echo", x)
    np.testing.assert_array_equal(y, x)
    assert len(double.hits) == parts
    assert double.max_in_flight == parts > 1


def test_several_outputs_need_the_map_form_or_return_info() -> None:
    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        return echo(body, outputs=("left", "right"))

    x = samples(2)
    with Double(answer) as double, Client(double.url) as mb:
        with pytest.raises(TypeError, match="2 outputs"):
            mb.predict("twin", x)
        assert double.hits == []  # refused before sending
        both = mb.predict("twin", {"input": x})
        p = mb.predict("twin", x, return_info=True)
    assert set(both) == set(p.outputs) == {"left", "right"}
    np.testing.assert_array_equal(p.outputs["right"], x)
    with pytest.raises(ValueError, match="2 outputs"):
        _ = p.output


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
