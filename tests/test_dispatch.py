"""The path table in front of the handlers (server/http/app.py): which paths reach infer, and
`Expect: 100-continue`, which aiohttp's low-level server leaves to the handler."""

from __future__ import annotations

import socket
import urllib.parse

import msgpack
import numpy as np
import pytest

from server.http.app import infer_model
from server.models.builtin import reference_forward
from tests.conftest import tensor
from tests.server_process import ServerProcess


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/models/linear/infer", "linear"),
        ("/v1/models/my-model.v2/infer", "my-model.v2"),
        ("/v1/models//infer", None),
        ("/v1/models/a/b/infer", None),
        ("/v1/models/linear/infer/", None),
        ("/v1/models", None),
        ("/v1/models/infer", None),
    ],
)
def test_the_infer_route_takes_one_non_empty_model_segment(path: str, model: str | None) -> None:
    assert infer_model(path) == model


def _expect_continue(server: ServerProcess, model: str) -> tuple[bytes, socket.socket]:
    """Send only the head of a POST with `Expect: 100-continue`; what comes back first."""
    parsed = urllib.parse.urlsplit(server.url)
    assert parsed.hostname is not None and parsed.port is not None
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=5.0)
    body = msgpack.packb({"inputs": {"x": tensor(np.arange(10, dtype=np.float32))}})
    sock.sendall(
        f"POST /v1/models/{model}/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    return sock.recv(65536), sock


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_expect_100_continue_is_answered_before_the_body_is_sent(
    default_server: ServerProcess,
) -> None:
    first, sock = _expect_continue(default_server, "linear")
    with sock:
        # The client has sent no body yet: the server must invite it rather than wait for it.
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        x = np.arange(10, dtype=np.float32)
        sock.sendall(msgpack.packb({"inputs": {"x": tensor(x)}}))
        head, rest = _read_response(sock)
    assert head.startswith(b"HTTP/1.1 200")
    out = np.frombuffer(msgpack.unpackb(rest)["outputs"]["output"]["data"], np.float32)
    np.testing.assert_allclose(out, reference_forward("linear", x[None])[0], rtol=1e-5)


def test_a_refused_request_is_answered_without_inviting_its_body(
    default_server: ServerProcess,
) -> None:
    first, sock = _expect_continue(default_server, "no-such-model")
    with sock:
        assert first.startswith(b"HTTP/1.1 404")
        assert b"100 Continue" not in first
