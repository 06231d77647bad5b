"""Shared fixtures: real server processes and small HTTP helpers (msgpack and JSON)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from tests.server_process import ServerProcess, start_server


@pytest.fixture(scope="session")
def default_server() -> Iterator[ServerProcess]:
    """The built-in models with default settings; shared by tests that do not disturb it."""
    with start_server() as server:
        yield server


def request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    all_headers = dict(headers or {})
    if content_type:
        all_headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def nested(levels: int) -> Any:
    """A value inside `levels` nested lists: [[...[1]...]], for the nesting limits."""
    obj: Any = 1
    for _ in range(levels):
        obj = [obj]
    return obj


def tensor(arr: np.ndarray) -> dict[str, Any]:
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


def infer_msgpack(
    url: str, model: str, payload: dict[str, Any], timeout_s: float = 30.0
) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = request(
        url,
        "POST",
        f"/v1/models/{model}/infer",
        msgpack.packb(payload),
        "application/msgpack",
        timeout_s=timeout_s,
    )
    return status, headers, msgpack.unpackb(body)


def infer_json(
    url: str, model: str, payload: dict[str, Any]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = request(
        url,
        "POST",
        f"/v1/models/{model}/infer",
        json.dumps(payload).encode(),
        "application/json",
    )
    return status, headers, json.loads(body)


def output_array(response: dict[str, Any], name: str = "output") -> np.ndarray:
    out = response["outputs"][name]
    return np.frombuffer(out["data"], dtype=out["dtype"]).reshape(out["shape"])
