"""Sidecar hardening against real server processes: loopback by default, a Unix socket with a
set mode, optional bearer-token auth on everything but /healthz (and /readyz's bare status for
probes), request limits that answer 4xx, random bodies that never get a 5xx, and no unpickling
anywhere in the server or client.
"""

from __future__ import annotations

import ast
import http.client
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import Client, Unauthorized
from server.config import ServerSettings
from tests.conftest import infer_msgpack, nested, request, tensor
from tests.probes import wait_for
from tests.server_process import ROOT, ServerProcess, start_server
from tests.wire_strategies import requests, structures

TOKEN = "s3cret-token-for-tests"
MSGPACK = "application/msgpack"
GUARDED = [
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/models/linear/infer"),
    ("GET", "/no/such/path"),
    ("DELETE", "/v1/models"),
]


def test_the_default_bind_is_loopback_only(default_server: ServerProcess) -> None:
    assert ServerSettings().host == "127.0.0.1"
    assert default_server.url.startswith("http://127.0.0.1:")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def test_unix_socket_gets_its_mode_and_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "mb.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # left behind, as by a server that was killed
    stale.close()
    env = {"MICROBATCH_SERVER_UDS_MODE": "0660"}
    with start_server("--model", "linear", "--uds", path, env=env) as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        conn = _UnixConnection(path)
        body = msgpack.packb({"inputs": {"x": tensor(np.ones(10, np.float32))}})
        conn.request("POST", "/v1/models/linear/infer", body, {"Content-Type": MSGPACK})
        assert conn.getresponse().status == 200
        conn.close()
        assert server.stop() == 0


def test_unix_socket_never_replaces_another_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    server = start_server("--model", "linear", "--uds", str(path))
    assert server.process.wait(60) == 1
    assert "exists and is not a socket" in server.log()
    assert path.read_text() == "keep me"


def start_with_token(env: dict[str, str]) -> ServerProcess:
    server = start_server("--model", "linear", env=env, wait_ready=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    wait_for(lambda: request(server.url, "GET", "/readyz", headers=auth)[0] == 200, 120, "ready")
    return server


@pytest.fixture(scope="module", params=["variable", "file"])
def guarded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    if request.param == "variable":
        env = {"MICROBATCH_SERVER_AUTH_TOKEN": TOKEN}
    else:
        token_file = tmp_path_factory.mktemp("token") / "token"
        token_file.write_text(TOKEN + "\n")
        env = {"MICROBATCH_SERVER_AUTH_TOKEN_FILE": str(token_file)}
    with start_with_token(env) as server:
        yield server


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"]
)
def test_every_endpoint_but_healthz_needs_the_token(
    guarded: ServerProcess, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path in GUARDED:
        if header is None and path == "/readyz":
            continue  # a probe's bare status: the next test
        status, response_headers, body = request(guarded.url, method, path, headers=headers)
        assert status == 401, (method, path)
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["code"] == "unauthorized"
    assert request(guarded.url, "GET", "/healthz", headers=headers)[0] == 200


def test_readyz_without_any_header_answers_the_phase_only(tmp_path: Path) -> None:
    # A kubelet's httpGet probe cannot send the secret: it gets the status code and the phase,
    # while the names and errors of models that failed stay behind the token.
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torchscript file")
    env = {
        "MICROBATCH_SERVER_AUTH_TOKEN": TOKEN,
        "MICROBATCH_SERVER_ON_MODEL_FAILURE": "serve_others",
    }
    server = start_server(
        "--model", "linear", "--model", f"bad={broken}:float32[4]", env=env, wait_ready=False
    )
    with server:
        wait_for(lambda: request(server.url, "GET", "/readyz")[0] == 200, 120, "ready")
        assert json.loads(request(server.url, "GET", "/readyz")[2]) == {"status": "ready"}
        assert request(server.url, "HEAD", "/readyz")[0] == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        detailed = json.loads(request(server.url, "GET", "/readyz", headers=auth)[2])
        assert detailed["status"] == "ready" and set(detailed["missing"]) == {"bad"}
        assert request(server.url, "POST", "/readyz")[0] == 401  # only a probe's methods
        assert request(server.url, "GET", "/metrics")[0] == 401


def test_the_token_opens_every_endpoint(guarded: ServerProcess) -> None:
    auth = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
    for path in ("/readyz", "/metrics", "/v1/models"):
        assert request(guarded.url, "GET", path, headers=auth)[0] == 200
    body = msgpack.packb({"inputs": {"x": tensor(np.ones(10, np.float32))}})
    status, _, _ = request(
        guarded.url, "POST", "/v1/models/linear/infer", body, MSGPACK, headers=auth
    )
    assert status == 200
    assert TOKEN not in guarded.log()  # the effective config is logged redacted


def test_the_python_client_sends_the_token(guarded: ServerProcess) -> None:
    with Client(guarded.url, token=TOKEN) as mb:
        assert mb.ready() and mb.predict("linear", np.ones(10, np.float32)).shape == (1,)
    with Client(guarded.url, retry=None) as mb, pytest.raises(Unauthorized):
        mb.predict("linear", np.ones(10, np.float32))


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ({"inputs": {"x": nested(40)}}, 400, "more than 16 deep"),
        ({"inputs": {"x": tensor(np.ones(10, np.float32))}, "id": "x" * 5000}, 400, "max_str_len"),
        ({"inputs": {f"i{n}": n for n in range(2000)}}, 400, "max_map_len"),
        (
            {"inputs": {"x": {"dtype": "float32", "shape": [1] * 9, "data": b"\0" * 4}}},
            400,
            "at most 8",
        ),
        (
            {"inputs": {"x": {"dtype": "float32", "shape": [2**24 + 1], "data": b""}}},
            413,
            "tensor elements",
        ),
        (
            {"inputs": {"x": {"dtype": "float32", "shape": [0, 2**62], "data": b""}}},
            413,
            "tensor elements",
        ),
        ({"inputs": msgpack.ExtType(7, b"\0")}, 400, "max_ext_len"),
    ],
    ids=["depth", "string", "map", "dims", "elements", "zero-dim", "ext-type"],
)
def test_limits_answer_4xx_naming_the_limit(
    default_server: ServerProcess, payload: dict[str, Any], status: int, fragment: str
) -> None:
    got, _, body = infer_msgpack(default_server.url, "linear", payload)
    assert got == status and fragment in body["error"]["message"], body


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(
        requests().map(msgpack.packb),
        structures.map(msgpack.packb),
        st.binary(max_size=256),
    ),
    st.sampled_from(["application/msgpack", "application/json"]),
)
def test_random_bodies_over_http_get_a_4xx_never_a_5xx(
    default_server: ServerProcess, body: bytes, content_type: str
) -> None:
    status, _, raw = request(
        default_server.url, "POST", "/v1/models/linear/infer", body, content_type
    )
    if status != 200:
        assert 400 <= status < 500, (status, raw[:300])
        decoded = msgpack.unpackb(raw) if "msgpack" in content_type else json.loads(raw)
        assert decoded["error"]["code"]


def test_the_server_is_healthy_after_random_bodies(default_server: ServerProcess) -> None:
    assert request(default_server.url, "GET", "/readyz")[0] == 200
    x = np.ones(10, np.float32)
    assert infer_msgpack(default_server.url, "linear", {"inputs": {"x": tensor(x)}})[0] == 200


FORBIDDEN_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "marshal",
    "shelve",
    "joblib",
}


def unpickling_sites(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        if FORBIDDEN_MODULES.intersection(names):
            found.append(f"{path}:{node.lineno} imports {names}")
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id == "torch"
            ):
                found.append(f"{path}:{node.lineno} calls torch.load (unpickles)")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{path}:{node.lineno} passes allow_pickle")
    return found


def test_nothing_in_the_server_or_client_unpickles() -> None:
    sources = [*(ROOT / "server").rglob("*.py"), *(ROOT / "client").rglob("*.py")]
    assert len(sources) > 20
    assert [site for path in sources for site in unpickling_sites(path)] == []
