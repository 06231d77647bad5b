"""The wire codec: round trips keep dtype, shape and bytes; malformed bodies raise a clear 4xx."""

from __future__ import annotations

import json
import warnings

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.errors import BadRequest, PayloadTooLarge, ServingError, UnsupportedMediaType
from server.models.spec import SUPPORTED_DTYPES
from server.protocol.codec import (
    JSON,
    MSGPACK,
    Limits,
    decode_request,
    decode_tensor,
    encode,
    encode_tensor,
    encoding_of,
)
from tests.conftest import nested

LIMITS = Limits()
dtypes = st.sampled_from(SUPPORTED_DTYPES).map(np.dtype)
arrays = dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5))
)


def body(inputs: dict[str, object], **extra: object) -> bytes:
    return msgpack.packb({"inputs": inputs, **extra})


def tensor(arr: np.ndarray) -> dict[str, object]:
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


@given(arrays)
def test_msgpack_round_trip_keeps_dtype_shape_and_bytes(arr: np.ndarray) -> None:
    wire = msgpack.unpackb(encode({"inputs": {"x": encode_tensor(arr, MSGPACK)}}, MSGPACK))
    decoded = decode_request(msgpack.packb(wire), MSGPACK, LIMITS).inputs["x"]
    assert decoded.dtype == arr.dtype
    assert decoded.shape == arr.shape
    assert decoded.tobytes() == arr.tobytes()


@given(arrays)
def test_json_round_trip_keeps_dtype_shape_and_values(arr: np.ndarray) -> None:
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0)
    text = encode({"inputs": {"x": encode_tensor(arr, JSON)}}, JSON)
    decoded = decode_request(text, JSON, LIMITS).inputs["x"]
    assert decoded.dtype == arr.dtype
    assert decoded.shape == arr.shape
    np.testing.assert_array_equal(decoded, arr)


def test_json_accepts_flat_and_nested_lists() -> None:
    flat = {"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3, 4]}
    nested = {"dtype": "float32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}
    for t in (flat, nested):
        got = decode_request(json.dumps({"inputs": {"x": t}}).encode(), JSON, LIMITS).inputs["x"]
        np.testing.assert_array_equal(got, np.array([[1, 2], [3, 4]], dtype=np.float32))


def test_request_fields_are_decoded() -> None:
    req = decode_request(
        body({"x": tensor(np.zeros(3, np.float32))}, id="abc", timeout_ms=12.5), MSGPACK, LIMITS
    )
    assert req.id == "abc" and req.timeout_ms == 12.5


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({"id": "a"}), "missing field 'inputs'"),
        (msgpack.packb({"inputs": {}}), "non-empty map"),
        (msgpack.packb({"inputs": {"x": 3}}), "inputs.x must be a map"),
        (body({"x": {"dtype": "complex64", "shape": [1], "data": b"12345678"}}), "inputs.x.dtype"),
        (body({"x": {"dtype": "float32", "shape": [3], "data": b"1234"}}), "has 4 bytes"),
        (body({"x": {"dtype": "float32", "shape": [-1], "data": b""}}), "non-negative integers"),
        (body({"x": {"dtype": "float32", "shape": "3", "data": b""}}), "shape must be a list"),
        (body({"x": {"dtype": "float32", "shape": [True], "data": b""}}), "non-negative"),
        (body({"x": {"dtype": "float32", "shape": [1], "data": "abcd"}}), "must be binary"),
        (body({"x": {"dtype": "bool", "shape": [1], "data": b"\x07"}}), "other than 0 and 1"),
        (body({"x": tensor(np.zeros(1, np.float32))}, id=5), "'id' must be a string"),
        (body({"x": tensor(np.zeros(1, np.float32))}, timeout_ms=-1), "timeout_ms"),
        (body({"x": tensor(np.zeros(1, np.float32))}, timeout_ms=True), "timeout_ms"),
        (body({"x": tensor(np.zeros(1, np.float32))}, extra=1), "unknown request field"),
        (body({"x": {"dtype": "float32", "shape": [1] * 9, "data": b"1234"}}), "dimensions"),
    ],
)
def test_malformed_msgpack_is_a_bad_request_naming_the_problem(raw: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        decode_request(raw, MSGPACK, LIMITS)


def test_huge_declared_shape_is_refused_before_any_allocation() -> None:
    raw = body({"x": {"dtype": "float64", "shape": [2**40, 2**40], "data": b""}})
    with pytest.raises(PayloadTooLarge, match="tensor elements"):
        decode_request(raw, MSGPACK, LIMITS)


def test_element_budget_is_shared_by_all_inputs() -> None:
    small = Limits(max_elements=10)
    t = tensor(np.zeros(6, np.float32))
    with pytest.raises(PayloadTooLarge):
        decode_request(body({"a": t, "b": t}), MSGPACK, small)


def test_bad_json_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="not valid json"):
        decode_request(b"{nope", JSON, LIMITS)
    ragged = {"inputs": {"x": {"dtype": "float32", "shape": [2, 2], "data": [[1, 2], [3]]}}}
    with pytest.raises(BadRequest, match=r"inputs\.x\.data"):
        decode_request(json.dumps(ragged).encode(), JSON, LIMITS)


def test_deep_nesting_is_a_bad_request_not_a_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(BadRequest):
        decode_request(deep, JSON, LIMITS)
    with pytest.raises(BadRequest):
        decode_request(b"\x91" * 100_000 + b"\xc0", MSGPACK, LIMITS)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_serving_errors(raw: bytes) -> None:
    for encoding in (MSGPACK, JSON):
        try:
            decode_request(raw, encoding, LIMITS)
        except ServingError as exc:
            assert 400 <= exc.http_status < 500


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0, max_value=199))
def test_truncated_valid_bodies_raise_only_bad_request(payload: bytes, cut: int) -> None:
    raw = body({"x": {"dtype": "uint8", "shape": [len(payload)], "data": payload}})
    truncated = raw[: min(cut, len(raw) - 1)]
    with pytest.raises(BadRequest):
        decode_request(truncated, MSGPACK, LIMITS)


def test_content_types() -> None:
    assert encoding_of("application/msgpack") == MSGPACK
    assert encoding_of("application/x-msgpack") == MSGPACK
    assert encoding_of("application/json; charset=utf-8") == JSON
    with pytest.raises(UnsupportedMediaType, match="text/plain"):
        encoding_of("text/plain")


def test_decoded_tensor_is_native_order() -> None:
    arr = np.arange(4, dtype=">i4")
    wire = {"dtype": "int32", "shape": [4], "data": arr.astype("<i4").tobytes()}
    got = decode_tensor(wire, "x", MSGPACK, LIMITS)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, np.arange(4))


def _json_tensor(dtype: str, shape: list[int], data: object) -> bytes:
    return json.dumps({"inputs": {"x": {"dtype": dtype, "shape": shape, "data": data}}}).encode()


@pytest.mark.parametrize(
    ("dtype", "data", "fragment"),
    [
        ("int64", [1, 1.5], r"inputs\.x\.data must hold integers for dtype int64, got .*1\.5"),
        ("int32", [[1], [2.0]], r"inputs\.x\.data must hold integers for dtype int32, got .*2\.0"),
        ("int64", [True, False], r"inputs\.x\.data must hold integers"),
        ("int8", [1, 300], r"inputs\.x\.data holds 300, out of range for dtype int8"),
        ("uint8", [-1, 1], r"inputs\.x\.data holds -1, out of range for dtype uint8"),
        ("int64", [2**63, 1], r"inputs\.x\.data holds 9223372036854775808, out of range"),
        ("bool", [0, 2], r"inputs\.x\.data holds 2, out of range for dtype bool \[0, 1\]"),
        ("bool", [1.0, 0.0], r"inputs\.x\.data must hold true/false \(or 0/1\) for dtype bool"),
        ("float32", [1.0, 1e39], r"inputs\.x\.data holds a value beyond the range of float32"),
        ("float32", [-1e39, 0], r"beyond the range of float32"),
        ("float16", [70000, 0], r"beyond the range of float16"),
        ("float32", ["1", "2"], r"inputs\.x\.data must hold numbers for dtype float32"),
        ("float64", [None, 1], r"inputs\.x\.data must hold numbers for dtype float64, got nothing"),
        ("float32", [10**20, 1], r"inputs\.x\.data holds 100000000000000000000, out of range"),
    ],
)
def test_json_values_must_fit_the_dtype(dtype: str, data: object, fragment: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow is refused, not a RuntimeWarning and inf
        with pytest.raises(BadRequest, match=fragment):
            decode_request(_json_tensor(dtype, [2], data), JSON, LIMITS)


@pytest.mark.parametrize(
    ("dtype", "data", "expected"),
    [
        ("int64", [1, -2], np.array([1, -2], np.int64)),
        ("int8", [-128, 127], np.array([-128, 127], np.int8)),
        ("bool", [True, False], np.array([True, False])),
        ("bool", [0, 1], np.array([False, True])),
        ("float32", [1, 2.5], np.array([1, 2.5], np.float32)),
        ("float32", [3.4e38, -3.4e38], np.array([3.4e38, -3.4e38], np.float32)),
        ("float32", [1e-50, 0], np.array([0, 0], np.float32)),  # underflow to 0 is no error
        ("float64", [1e300, 1], np.array([1e300, 1])),
        ("float32", [1e20, 1], np.array([1e20, 1], np.float32)),
        ("int64", [2**63 - 1, -(2**63)], np.array([2**63 - 1, -(2**63)], np.int64)),
    ],
)
def test_json_values_that_fit_are_kept(dtype: str, data: object, expected: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = decode_request(_json_tensor(dtype, [2], data), JSON, LIMITS).inputs["x"]
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("obj", "limits", "fragment"),
    [
        (
            {"inputs": {}, "id": "a" * 200},
            Limits(max_str_bytes=100),
            r"200 exceeds max_str_len\(100\), the limit set by server\.max_msgpack_str_bytes",
        ),
        (
            {"inputs": {"x": {"dtype": "float32", "shape": [1] * 50, "data": b""}}},
            Limits(max_items=20),
            r"50 exceeds max_array_len\(20\), the limit set by server\.max_msgpack_items",
        ),
        (
            {"inputs": {str(i): i for i in range(30)}},
            Limits(max_items=20),
            r"30 exceeds max_map_len\(20\), the limit set by server\.max_msgpack_items",
        ),
        (
            {"inputs": {"x": nested(10)}},
            Limits(max_depth=4),
            r"more than 4 deep \(server\.max_msgpack_depth\)",
        ),
        (
            {"inputs": msgpack.ExtType(1, b"ab")},
            LIMITS,
            r"max_ext_len\(0\); msgpack ext types are refused",
        ),
    ],
)
def test_msgpack_limit_refusals_name_the_server_setting(
    obj: object, limits: Limits, fragment: str
) -> None:
    with pytest.raises(BadRequest, match=fragment):
        decode_request(msgpack.packb(obj), MSGPACK, limits)


def test_a_length_beyond_the_body_is_corruption_not_a_setting() -> None:
    # An array32 header claiming 65536 entries, then 10 bytes: the body bounds it, not a setting.
    with pytest.raises(BadRequest, match="not valid msgpack") as caught:
        decode_request(b"\xdd\x00\x01\x00\x00" + b"\x01" * 10, MSGPACK, LIMITS)
    assert "server." not in str(caught.value) and "truncated or corrupt" in str(caught.value)
