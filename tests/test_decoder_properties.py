"""Hypothesis properties over the request decoder and validation: any bytes, any msgpack
structure, any dtype and shape get either a decoded request or a 4xx ServingError with a code,
never another exception; and a small body never makes a large allocation.

Runs in the test process on the codec and the model matching alone (no server, no torch).
Volume: the @settings below, 2,100 examples a run (1,000 byte strings, 3 x 300 structures,
200 under tracemalloc); the coverage-guided fuzzer is tests/fuzz/fuzz_decoder.py.
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import BadRequest, ServingError
from server.models.matching import match_inputs
from server.models.spec import TensorSpec
from server.protocol.codec import JSON, MSGPACK, Limits, decode_request
from tests.wire_strategies import requests, structures

LIMITS = Limits(max_elements=4096, max_dims=8)
SPECS = (TensorSpec("x", "float32", (2, 3)),)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(body: bytes, encoding: str) -> str:
    """'ok' or the 4xx code; any other exception fails the test as it is."""
    try:
        decoded = decode_request(body, encoding, LIMITS)
        match_inputs("m", SPECS, decoded.inputs, max_batch=8)
    except ServingError as error:
        assert 400 <= error.http_status < 500, (error.http_status, error.message)
        assert error.code.value and error.message
        return error.code.value
    return "ok"


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=512), st.sampled_from([MSGPACK, JSON]))
def test_any_bytes_get_a_decoded_request_or_a_4xx(body: bytes, encoding: str) -> None:
    outcome(body, encoding)


@FAST
@given(structures)
def test_any_msgpack_structure_gets_a_decoded_request_or_a_4xx(obj: Any) -> None:
    outcome(msgpack.packb(obj), MSGPACK)


@FAST
@given(requests())
def test_any_dtype_shape_and_data_get_a_decoded_request_or_a_4xx(obj: dict[Any, Any]) -> None:
    outcome(msgpack.packb(obj), MSGPACK)


@FAST
@given(requests())
def test_the_same_in_json(obj: dict[Any, Any]) -> None:
    try:
        text = json.dumps(obj, default=lambda b: list(b)).encode()
    except (TypeError, ValueError):
        return  # not expressible in JSON (non-string keys and the like)
    outcome(text, JSON)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests() | structures.map(lambda o: {"inputs": o}), st.sampled_from([MSGPACK, JSON]))
def test_a_small_body_never_makes_a_large_allocation(obj: Any, encoding: str) -> None:
    try:
        body = msgpack.packb(obj) if encoding == MSGPACK else json.dumps(obj).encode()
    except (TypeError, ValueError):
        return
    tracemalloc.start()
    try:
        outcome(body, encoding)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Python objects cost tens of bytes for one byte of msgpack; a declared shape costs nothing.
    assert peak <= 64 * len(body) + 256 * 1024, (peak, len(body))


@pytest.mark.parametrize(
    "shape", [[0, 2**64 - 1], [0, 2**40, 2**40], [2**63, 0], [0] * 7 + [2**62]], ids=str
)
def test_a_zero_dimension_does_not_hide_an_absurd_shape(shape: list[int]) -> None:
    tensor = {"dtype": "float32", "shape": shape, "data": b""}
    assert outcome(msgpack.packb({"inputs": {"x": tensor}}), MSGPACK) == "payload_too_large"
    tensor["data"] = []
    assert outcome(json.dumps({"inputs": {"x": tensor}}).encode(), JSON) == "payload_too_large"
    tensor["shape"] = [0, 2**70]  # beyond msgpack, not beyond JSON
    assert outcome(json.dumps({"inputs": {"x": tensor}}).encode(), JSON) == "payload_too_large"


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        (([[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]), "more than 16 deep"),
        (
            {
                "inputs": {"x": {"dtype": "float32", "shape": [1], "data": b"\0" * 4}},
                "id": "é" * 3000,
            },
            "exceeds max_str_len",
        ),
        ({"inputs": {"x": {"dtype": "float32", "shape": list(range(2000))}}}, "max_array_len"),
        ({"inputs": {str(i): i for i in range(1100)}}, "max_map_len"),
        ({"inputs": msgpack.ExtType(1, b"\0\0")}, "max_ext_len"),
    ],
)
def test_msgpack_limits_are_a_400_naming_the_limit(obj: Any, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        decode_request(msgpack.packb(obj), MSGPACK, Limits())


def test_deep_json_is_a_400() -> None:
    with pytest.raises(BadRequest):
        decode_request(b"[" * 100_000 + b"]" * 100_000, JSON, Limits())


def test_declared_size_is_checked_against_the_body_before_any_buffer() -> None:
    body = msgpack.packb({"inputs": {"x": {"dtype": "float64", "shape": [4096], "data": b""}}})
    with pytest.raises(BadRequest, match="need 32768"):
        decode_request(body, MSGPACK, LIMITS)
    tracemalloc.start()
    try:
        assert outcome(body, MSGPACK) == "bad_request"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 < np.dtype("float64").itemsize * 4096
