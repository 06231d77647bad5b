"""The OIP codec without a server: every datatype round-trips as binary and as JSON (flat or
nested), responses frame binary data after their JSON header, and routes parse as Triton's.
"""

from __future__ import annotations

import json
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import BadRequest, PayloadTooLarge
from server.http.oip_handlers import Route, parse_route
from server.protocol.codec import Limits
from server.protocol.oip import Framing, OipRequest, RequestedOutput, decode_infer_request
from server.protocol.oip_response import encode_infer_response
from server.protocol.oip_tensor import WIRE_DTYPES, from_json

LIMITS = Limits()


def framing(header_length: int | None = None, outputs: tuple[str, ...] = ("y",)) -> Framing:
    return Framing(
        header_length=None if header_length is None else str(header_length),
        content_encoding=None,
        output_names=outputs,
    )


def decode(obj: dict[str, Any], tail: bytes = b"", **kw: Any) -> OipRequest:
    header = json.dumps(obj).encode()
    return decode_infer_request(header + tail, framing(len(header) if tail else None, **kw), LIMITS)


def arrays(datatype: str) -> st.SearchStrategy[np.ndarray]:
    dtype = WIRE_DTYPES[datatype]
    elements = None
    if dtype.kind == "f":
        elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    return hnp.arrays(
        dtype, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), elements=elements
    )


@settings(max_examples=25, deadline=None)
@given(data=st.data(), datatype=st.sampled_from(sorted(WIRE_DTYPES)))
def test_every_datatype_round_trips_as_binary_and_as_json(
    data: st.DataObject, datatype: str
) -> None:
    x = data.draw(arrays(datatype))
    meta = {"name": "x", "shape": list(x.shape), "datatype": datatype}
    binary = decode(
        {"inputs": [{**meta, "parameters": {"binary_data_size": x.nbytes}}]}, x.tobytes()
    )
    flat = decode({"inputs": [{**meta, "data": x.ravel().tolist()}]})
    nested = decode({"inputs": [{**meta, "data": x.tolist()}]})
    for got in (binary.inputs["x"], flat.inputs["x"], nested.inputs["x"]):
        assert got.dtype == x.dtype.newbyteorder("=") and got.shape == x.shape
        np.testing.assert_array_equal(got, x)


def test_bf16_binary_widens_exactly_to_float32() -> None:
    values = np.array([1.5, -2.0, 2.0**100, -0.15625], np.float32)
    halves = (values.view(np.uint32) >> 16).astype("<u2")  # exact in bf16
    got = decode(
        {"inputs": [{"name": "x", "shape": [4], "datatype": "BF16",
                     "parameters": {"binary_data_size": 8}}]},
        halves.tobytes(),
    ).inputs["x"]  # fmt: skip
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ({"datatype": "UINT8", "data": [256]}, "outside [0, 255]"),
        ({"datatype": "UINT64", "data": [-1]}, "outside"),
        ({"datatype": "INT32", "data": [1.5]}, "integers"),
        ({"datatype": "BOOL", "data": [2]}, "outside [0, 1]"),
        ({"datatype": "FP16", "data": [1e6]}, "beyond the range of FP16"),
        ({"datatype": "FP32", "data": [True]}, "numbers"),
        ({"datatype": "FP32", "data": [[1], [2, 3]]}, "regular list"),
    ],
)
def test_json_values_must_fit_their_datatype(tensor: dict[str, Any], words: str) -> None:
    n = len(tensor["data"]) if tensor["data"] and not isinstance(tensor["data"][0], list) else 1
    with pytest.raises(BadRequest, match=words.replace("[", r"\[")):
        decode({"inputs": [{"name": "x", "shape": [n], **tensor}]})


def test_shapes_over_the_element_limit_allocate_nothing() -> None:
    with pytest.raises(PayloadTooLarge):
        decode({"inputs": [{"name": "x", "shape": [0, 2**62], "datatype": "FP32", "data": []}]})


def test_binary_bool_bytes_must_be_0_or_1() -> None:
    meta = {"name": "x", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}
    with pytest.raises(BadRequest, match="0 and 1"):
        decode({"inputs": [meta]}, b"\x01\x02")


def test_requested_outputs_and_parameters_are_read() -> None:
    x = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}
    got = decode(
        {
            "id": "r",
            "inputs": [x],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": True, "timeout": 2500, "priority": 1},
        }
    )
    assert got.id == "r" and got.timeout_ms == 2.5 and got.binary_output
    assert got.outputs == (RequestedOutput("y", False),)


def test_a_response_frames_binary_outputs_after_its_json_header() -> None:
    outputs = {"a": np.arange(3, dtype=np.int16), "b": np.ones((2, 2), np.float64)}
    request = OipRequest(
        {}, "id-1", None, (RequestedOutput("b", True), RequestedOutput("a", False)), False
    )
    body, header_length = encode_infer_response("m", outputs, request, {"batch_size": 2})
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert header["model_name"] == "m" and header["id"] == "id-1"
    assert header["parameters"] == {"batch_size": 2}
    assert [o["name"] for o in header["outputs"]] == ["b", "a"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 32}
    assert header["outputs"][1] == {
        "name": "a",
        "datatype": "INT16",
        "shape": [3],
        "data": [0, 1, 2],
    }
    np.testing.assert_array_equal(np.frombuffer(body[header_length:], "<f8"), np.ones(4))


def test_a_json_only_response_has_no_header_length() -> None:
    request = OipRequest({}, None, None, None, False)
    body, header_length = encode_infer_response("m", {"y": np.zeros(1, bool)}, request, {})
    assert header_length is None and "id" not in json.loads(body)
    assert json.loads(body)["outputs"][0]["datatype"] == "BOOL"


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v2", Route("server")),
        ("/v2/health/live", Route("health_live")),
        ("/v2/models/stats", Route("models_stats")),
        ("/v2/models/m", Route("model", "m")),
        ("/v2/models/m/versions/1", Route("model", "m", "1")),
        ("/v2/models/m/versions/1/infer", Route("infer", "m", "1")),
        ("/v2/models/m/stats", Route("stats", "m")),
        ("/v2/models/m/config", Route("config", "m")),
        ("/v2/models/m/ready", Route("ready", "m")),
        ("/v2/models/m/versions", None),
        ("/v2/models/m/versions//infer", None),
        ("/v2/models//infer", None),
        ("/v2/models/m/load", None),
        ("/v2/health", None),
        ("/v2/repository/index", None),
    ],
)
def test_routes_parse_as_triton_names_them(path: str, route: Route | None) -> None:
    assert parse_route(path) == route


def test_uint64_json_values_of_2_to_the_63_and_above_keep_every_digit() -> None:
    # numpy reads [2**63, 1] as float64; the decoder reads such a list again as integers.
    got = from_json([2**63 + 1, 1, 2**64 - 1], "UINT64", [3], 3, "x")
    assert got.dtype == np.uint64 and got.tolist() == [2**63 + 1, 1, 2**64 - 1]
    for bad in ([2**64, 1], [-1, 2**63], [1.5, 2**63]):
        with pytest.raises(BadRequest):
            from_json(bad, "UINT64", [2], 2, "x")
