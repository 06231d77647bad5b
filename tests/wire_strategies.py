"""Hypothesis strategies for what a client may send: any msgpack-able structure, and requests
with arbitrary dtypes, shapes and data. Shared by the decoder properties and the HTTP fuzz test.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from server.models.spec import SUPPORTED_DTYPES

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=64)
)
structures = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(scalars, inner, max_size=6),
    max_leaves=40,
)
dims = st.integers(-3, 6) | st.sampled_from([0, 2**31, 2**63, 2**64 - 1, -(2**63)])
shapes = st.lists(dims, max_size=10) | structures
dtypes = st.sampled_from([*SUPPORTED_DTYPES, "bfloat16", "object", "<f4", ""]) | scalars


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    tensor: dict[str, Any] = {"dtype": draw(dtypes), "shape": draw(shapes)}
    if draw(st.booleans()):
        tensor["data"] = draw(st.binary(max_size=256) | structures)
    if draw(st.booleans()):
        tensor[draw(st.text(max_size=5))] = draw(scalars)
    return tensor


@st.composite
def requests(draw: st.DrawFn) -> dict[Any, Any]:
    body: dict[Any, Any] = {
        "inputs": draw(st.dictionaries(st.text(max_size=4), tensors(), max_size=3))
    }
    for key in ("id", "timeout_ms"):
        if draw(st.booleans()):
            body[key] = draw(scalars)
    return body
