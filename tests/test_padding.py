"""Padding on the event loop's side: staging writes each request at the front of the batch's
padded length, the rest the input's `pad` value, and fills masks and lengths from each sample's
own length; the filled values are those a model needs to ignore the padding."""

from __future__ import annotations

import asyncio

import numpy as np

from server.batching.pending import PendingRequest, RequestResult
from server.executors.base import Batch
from server.executors.staging import Staging
from server.models.padding import filled, zero_batch
from server.models.spec import TensorSpec

IDS = TensorSpec("ids", "int64", (-1,), pad=1)
FRAMES = TensorSpec("frames", "float32", (-1, 2), pad=-0.5)
MASK = TensorSpec("mask", "bool", (-1,), fill="padding_mask")
ATTENTION = TensorSpec("attention", "int64", (-1,), fill="attention_mask")
LENGTHS = TensorSpec("lengths", "int32", (), fill="lengths")
INPUTS = (IDS, FRAMES, MASK, ATTENTION, LENGTHS)
OUT = TensorSpec("out", "float32", (-1,))


def pending(length: int, rows: int) -> PendingRequest:
    ids = np.arange(rows * length, dtype=np.int64).reshape(rows, length) + 10
    frames = np.full((rows, length, 2), float(length), np.float32)
    future: asyncio.Future[RequestResult] = asyncio.Future(loop=asyncio.new_event_loop())
    inputs = {"ids": ids, "frames": frames}
    return PendingRequest(inputs, rows, False, 0.0, 1.0, future, length=length)


def test_staging_pads_each_request_and_fills_masks_and_lengths() -> None:
    staging = Staging({"m": (INPUTS, (OUT,), 8, 16)}, slots=2)
    try:
        requests = [pending(3, 2), pending(5, 1), pending(1, 1)]
        batch = Batch("m", requests, 4, length=5)
        staging.stage(1, batch)
        ids, frames, mask, attention, lengths = (
            p.view_at(staging._buf, 4, 5) for p in staging._places[1]["m"].inputs
        )
        np.testing.assert_array_equal(ids[:2, :3], requests[0].inputs["ids"])
        np.testing.assert_array_equal(ids[:2, 3:], 1)  # the pad value
        np.testing.assert_array_equal(ids[2], requests[1].inputs["ids"][0])
        np.testing.assert_array_equal(ids[3], [10, 1, 1, 1, 1])
        np.testing.assert_array_equal(frames[0, 3:], -0.5)
        np.testing.assert_array_equal(frames[2], 5.0)
        own = np.array([3, 3, 5, 1])
        np.testing.assert_array_equal(lengths, own)
        np.testing.assert_array_equal(mask, np.arange(5)[None] >= own[:, None])
        np.testing.assert_array_equal(attention, np.arange(5)[None] < own[:, None])
        out = staging._places[1]["m"].outputs[0].view_at(staging._buf, 4, 5)
        out[...] = np.arange(20, dtype=np.float32).reshape(4, 5)
        np.testing.assert_array_equal(staging.outputs(1, batch)["out"], out)
    finally:
        staging.close()


def test_zero_batches_for_warm_up_have_no_padding() -> None:
    ids, frames, mask, attention, lengths = zero_batch(INPUTS, 3, 7)
    assert ids.shape == (3, 7) and frames.shape == (3, 7, 2)
    assert not mask.any() and attention.all() and lengths.tolist() == [7, 7, 7]
    assert filled(LENGTHS, np.array([2, 4]), 4).dtype == np.int32
