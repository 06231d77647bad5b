"""Matching a request's tensors to a model's inputs: names, sample counts, shapes, casts."""

from __future__ import annotations

import numpy as np
import pytest

from server.config import BatchingConfig
from server.errors import BadRequest
from server.models.info import ModelInfo
from server.models.matching import castable, match_inputs
from server.models.spec import TensorSpec

ONE = (TensorSpec("input", "float32", (4,)),)
TWO = (TensorSpec("a", "float32", (2,)), TensorSpec("b", "int64", (3,)))


def test_single_input_accepts_any_name_and_one_or_many_samples() -> None:
    inputs, samples, single, _ = match_inputs("m", ONE, {"whatever": np.zeros(4, np.float32)}, 8)
    assert (samples, single) == (1, True) and inputs["input"].shape == (1, 4)
    inputs, samples, single, _ = match_inputs("m", ONE, {"x": np.zeros((3, 4), np.float32)}, 8)
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


# The inputs a client sends: the model's, less those the server fills (ModelInfo works it out).
DYN = ModelInfo(
    "m",
    (
        TensorSpec("ids", "int64", (-1,)),
        TensorSpec("frames", "float32", (-1, 2)),
        TensorSpec("mask", "bool", (-1,), fill="padding_mask"),
    ),
    (),
    BatchingConfig(),
).sent_inputs


def test_a_dynamic_dimension_takes_any_length_one_per_request() -> None:
    one = {"ids": np.zeros(5, np.int64), "frames": np.zeros((5, 2), np.float32)}
    inputs, samples, single, length = match_inputs("m", DYN, one, 8, 16)
    assert (samples, single, length) == (1, True, 5) and inputs["frames"].shape == (1, 5, 2)
    assert "mask" not in inputs  # the server fills it
    many = {"ids": np.zeros((3, 7), np.int64), "frames": np.zeros((3, 7, 2), np.float32)}
    assert match_inputs("m", DYN, many, 8, 16)[1:] == (3, False, 7)


def test_lengths_must_agree_fit_max_length_and_not_be_empty() -> None:
    def sent(ids: int, frames: int) -> dict[str, np.ndarray]:
        return {"ids": np.zeros((1, ids), np.int64), "frames": np.zeros((1, frames, 2), np.float32)}

    with pytest.raises(BadRequest, match=r"frames has length 4 but inputs\.ids has length 5"):
        match_inputs("m", DYN, sent(5, 4), 8, 16)
    with pytest.raises(BadRequest, match=r"length 17; model 'm' takes at most 16 \(max_length\)"):
        match_inputs("m", DYN, sent(17, 17), 8, 16)
    with pytest.raises(BadRequest, match="length 0"):
        match_inputs("m", DYN, sent(0, 0), 8, 16)
    with pytest.raises(BadRequest, match=r"n samples of shape \[n, L, 2\] \(L: any length\)"):
        match_inputs(
            "m", DYN, {"ids": np.zeros((1, 3), np.int64), "frames": np.zeros((1, 3, 3))}, 8, 16
        )
    with pytest.raises(BadRequest, match=r"unknown \['mask'\]"):
        match_inputs("m", DYN, {**sent(3, 3), "mask": np.zeros((1, 3), bool)}, 8, 16)
