"""The client on a stale keep-alive connection: the server closed (or reset) a pooled connection
that the client then sends a POST on. Retried when nothing of an answer came, never otherwise.

The stand-in is a raw asyncio HTTP/1.1 server on 127.0.0.1 port 0 in the test's own loop, so
that it can do what a real server does when it drops an idle connection at the moment a
request arrives: close without a byte of answer (FIN), or with the request unread (RST).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp.http
import msgpack
import numpy as np
import pytest

import client
from client import AsyncClient, RetryPolicy

FAST_RETRY = RetryPolicy(max_retries=3, backoff_initial_s=0.001, backoff_max_s=0.01)
MODELS = {
    "models": [
        {
            "name": "echo",
            "inputs": [{"name": "input", "dtype": "float32", "shape": [2]}],
            "outputs": [{"name": "output", "dtype": "float32", "shape": [2]}],
            "batching": {"max_batch_size": 64, "max_delay_ms": 1.0},
        }
    ]
}


@dataclass
class StaleServer:
    """Answers every request but a POST that comes as request `drop_at` (counting from 1) of
    its connection, which it drops the way `how` says: "close" (the request read, then FIN),
    "reset" (the body left unread, so the kernel sends RST), "partial" (a few bytes of a status
    line, then FIN: the request was answered in part). With `drop_at=1`, the model listing ends
    its connection (Connection: close), so that the POST comes on a new one."""

    how: str
    drop_at: int = 2
    posts: list[bytes] = field(default_factory=list)  # every POST body read in full
    dropped: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for n in range(1, 1000):
                head = await reader.readuntil(b"\r\n\r\n")
                drop = n == self.drop_at and head.startswith(b"POST ")
                if drop and self.how == "reset":
                    self.dropped += 1
                    return  # closed with the body unread
                body = await reader.readexactly(_content_length(head))
                if drop:
                    self.dropped += 1
                    if self.how == "partial":
                        writer.write(b"HTTP/1.1 20")
                        await writer.drain()
                    return
                last = self.drop_at == 1 and head.startswith(b"GET ")
                writer.write(self.answer(head, body, last))
                await writer.drain()
                if last:
                    return
        except asyncio.IncompleteReadError:
            return  # the client closed the connection
        finally:
            writer.close()

    def answer(self, head: bytes, body: bytes, last: bool) -> bytes:
        if head.startswith(b"GET /v1/models "):
            return _response(json.dumps(MODELS).encode(), "application/json", last)
        self.posts.append(body)
        request = msgpack.unpackb(body)
        (tensor,) = request["inputs"].values()
        reply = {
            "outputs": {"output": tensor},
            "id": request["id"],
            "model": "echo",
            "batch_size": 1,
            "device": "cpu",
            "queue_ms": 0.1,
            "compute_ms": 0.1,
        }
        return _response(msgpack.packb(reply), "application/msgpack", False)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _response(body: bytes, content_type: str, last: bool) -> bytes:
    # Without "Connection: close" the client keeps the connection for its next request.
    close = "Connection: close\r\n" if last else ""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{close}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@asynccontextmanager
async def serving(stale: StaleServer) -> AsyncIterator[str]:
    server = await asyncio.start_server(stale.handle, "127.0.0.1", 0)
    stale.port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{stale.port}"
    finally:
        server.close()
        await server.wait_closed()


X = np.array([1.0, 2.0], np.float32)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_post_on_a_stale_connection_is_retried_on_a_new_one(how: str) -> None:
    stale = StaleServer(how)
    async with serving(stale) as url, AsyncClient(url, retry=FAST_RETRY) as mb:
        # The model listing opens the connection; the POST then reuses it and is dropped.
        y = await mb.predict("echo", X, request_id="once")
    np.testing.assert_array_equal(y, X)
    assert stale.dropped == 1
    assert [msgpack.unpackb(b)["id"] for b in stale.posts] == ["once"]  # answered once
    if how == "reset":
        assert len(stale.posts) == 1  # the dropped attempt was never read, let alone computed


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_without_retries_a_stale_connection_is_a_connect_error(how: str) -> None:
    stale = StaleServer(how)
    async with serving(stale) as url, AsyncClient(url, retry=None) as mb:
        with pytest.raises(client.ConnectError, match="reused keep-alive connection"):
            await mb.predict("echo", X)


@pytest.mark.skipif(
    aiohttp.http.HttpResponseParser.__module__ != "aiohttp._http_parser",
    reason="only aiohttp's C parser reports a partial answer (see client/transport.py)",
)
async def test_a_partly_answered_request_is_not_retried() -> None:
    stale = StaleServer("partial")
    async with serving(stale) as url, AsyncClient(url, retry=FAST_RETRY) as mb:
        with pytest.raises(client.TransportError) as caught:
            await mb.predict("echo", X)
    assert not isinstance(caught.value, client.ConnectError)
    assert stale.dropped == 1  # tried once: answer bytes came, so it may have been computed


async def test_a_new_connection_closed_unanswered_is_not_retried() -> None:
    # The first request of a connection: no stale connection to blame; the server itself
    # dropped this request (it may have crashed on it), so it is not sent again.
    stale = StaleServer("close", drop_at=1)
    async with serving(stale) as url, AsyncClient(url, retry=FAST_RETRY) as mb:
        with pytest.raises(client.TransportError) as caught:
            await mb.predict("echo", X)
    assert not isinstance(caught.value, client.ConnectError)
    assert stale.dropped == 1


async def test_with_several_endpoints_a_new_connection_closed_unanswered_goes_elsewhere() -> None:
    # The server may have failed on this very request, so it is never sent there again; but
    # inference is safe to repeat, so another endpoint gets it (one endpoint: the test above).
    dropping, answering = StaleServer("close", drop_at=1), StaleServer("close", drop_at=10**6)
    async with (
        serving(dropping) as dropping_url,
        serving(answering) as answering_url,
        AsyncClient([dropping_url, answering_url], retry=FAST_RETRY) as mb,
    ):
        for i in range(20):
            y = await mb.predict("echo", X + i, request_id=f"r{i}")
            np.testing.assert_array_equal(y, X + i)
    answered = [msgpack.unpackb(b)["id"] for b in answering.posts]
    assert answered == [f"r{i}" for i in range(20)]  # each once, in order
    assert dropping.dropped >= 1  # chosen first about half of the time, then skipped
