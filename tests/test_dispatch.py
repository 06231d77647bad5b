"""The path table in front of the handlers (server/http/app.py): which paths reach infer."""

from __future__ import annotations

import pytest

from server.http.app import infer_model


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/models/linear/infer", "linear"),
        ("/v1/models/my-model.v2/infer", "my-model.v2"),
        ("/v1/models//infer", None),
        ("/v1/models/a/b/infer", None),
        ("/v1/models/linear/infer/", None),
        ("/v1/models", None),
        ("/v1/models/infer", None),
    ],
)
def test_the_infer_route_takes_one_non_empty_model_segment(path: str, model: str | None) -> None:
    assert infer_model(path) == model
