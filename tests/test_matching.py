"""Matching a request's tensors to a model's inputs: names, sample counts, shapes, casts."""

from __future__ import annotations

import numpy as np
import pytest

from server.errors import BadRequest
from server.models.matching import castable, match_inputs
from server.models.spec import TensorSpec

ONE = (TensorSpec("input", "float32", (4,)),)
TWO = (TensorSpec("a", "float32", (2,)), TensorSpec("b", "int64", (3,)))


def test_single_input_accepts_any_name_and_one_or_many_samples() -> None:
    inputs, samples, single = match_inputs("m", ONE, {"whatever": np.zeros(4, np.float32)}, 8)
    assert (samples, single) == (1, True) and inputs["input"].shape == (1, 4)
    inputs, samples, single = match_inputs("m", ONE, {"x": np.zeros((3, 4), np.float32)}, 8)
    assert (samples, single) == (3, False) and inputs["input"].shape == (3, 4)


def test_several_inputs_need_their_names_and_equal_sample_counts() -> None:
    ok = {"a": np.zeros((2, 2), np.float32), "b": np.zeros((2, 3), np.int64)}
    assert match_inputs("m", TWO, ok, 8)[1] == 2
    with pytest.raises(BadRequest, match=r"missing \['b'\]"):
        match_inputs("m", TWO, {"a": np.zeros(2, np.float32)}, 8)
    with pytest.raises(BadRequest, match="same number of samples"):
        match_inputs(
            "m", TWO, {"a": np.zeros((2, 2), np.float32), "b": np.zeros((3, 3), np.int64)}, 8
        )


@pytest.mark.parametrize(
    ("src", "dst", "ok"),
    [
        ("float64", "float32", True),
        ("int64", "float32", True),
        ("bool", "float32", True),
        ("int32", "int64", True),
        ("float32", "int64", False),
        ("int64", "int32", False),
        ("float32", "bool", False),
        ("uint8", "float16", True),
    ],
)
def test_cast_rules(src: str, dst: str, ok: bool) -> None:
    assert castable(np.dtype(src), np.dtype(dst)) is ok


def test_refused_cast_names_the_input_and_both_dtypes() -> None:
    spec = (TensorSpec("ids", "int64", (2,)),)
    with pytest.raises(BadRequest, match=r"inputs\.ids has dtype float32; model 'm' expects int64"):
        match_inputs("m", spec, {"ids": np.zeros(2, np.float32)}, 8)


def test_sample_limits() -> None:
    with pytest.raises(BadRequest, match="at most 8 per request"):
        match_inputs("m", ONE, {"x": np.zeros((9, 4), np.float32)}, 8)
    with pytest.raises(BadRequest, match="0 samples"):
        match_inputs("m", ONE, {"x": np.zeros((0, 4), np.float32)}, 8)
    with pytest.raises(BadRequest, match=r"expects one sample of shape \[4\]"):
        match_inputs("m", ONE, {"x": np.zeros((2, 5), np.float32)}, 8)
