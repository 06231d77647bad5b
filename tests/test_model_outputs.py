"""A batch's outputs are checked against the model's declared outputs before they are copied
out: a missing output, another per-sample shape, or another number of rows than samples (a
[1, ...] output would broadcast to the whole batch) fails that batch with a clear message. The
check itself, then a real server with a model that returns one row for a batch of several."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from server.models.loading import declared_output
from server.models.spec import TensorSpec
from tests import fault_models
from tests.conftest import infer_msgpack, output_array, tensor
from tests.server_process import ServerProcess, start_server

SPEC = TensorSpec("output", "float32", (2,))


def test_an_output_with_one_row_per_sample_passes() -> None:
    produced = torch.zeros(3, 2)
    assert declared_output({"output": produced}, SPEC, 3) is produced


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_another_number_of_rows_than_samples_fails_the_batch(rows: int) -> None:
    with pytest.raises(ValueError) as caught:
        declared_output({"output": torch.zeros(rows, 2)}, SPEC, 3)
    assert str(caught.value) == (
        f"output 'output' has shape [{rows}, 2] for a batch of 3 samples: a model must "
        "return one row per sample"
    )


def test_a_scalar_output_fails_the_batch() -> None:
    with pytest.raises(ValueError, match=r"has shape \[\] for a batch of 1 samples"):
        declared_output({"output": torch.tensor(1.0)}, SPEC, 1)


def test_a_missing_output_or_another_per_sample_shape_fails_the_batch() -> None:
    with pytest.raises(ValueError, match="'output' missing"):
        declared_output({}, SPEC, 1)
    with pytest.raises(ValueError, match=r"per-sample shape \[3\], expected \[2\]"):
        declared_output({"output": torch.zeros(1, 3)}, SPEC, 1)


@pytest.fixture(scope="module")
def one_row_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = fault_models.save(fault_models.OneRow(), tmp_path_factory.mktemp("m") / "one.pt")
    with start_server("--model", f"one={path}:float32[2]", "--max-batch-size", "4") as server:
        yield server


def test_a_model_that_returns_one_row_for_several_samples_fails_them(
    one_row_server: ServerProcess,
) -> None:
    x = np.array([[fault_models.ONE_ROW, 1.0], [3.0, 4.0]], np.float32)
    status, _, body = infer_msgpack(one_row_server.url, "one", {"inputs": {"x": tensor(x)}})
    assert status == 500 and body["error"]["code"] == "model_error"
    assert "shape [1, 2] for a batch of 2" in body["error"]["message"]
    # The server is fine, and a model that answers one row per sample is answered.
    y = np.array([[5.0, 6.0], [7.0, 8.0]], np.float32)
    status, _, body = infer_msgpack(one_row_server.url, "one", {"inputs": {"x": tensor(y)}})
    assert status == 200
    np.testing.assert_array_equal(output_array(body), 2 * y)
