"""A served model as `GET /v1/models` describes it: input and output specs, batching settings.

Plain frozen data parsed from the listing on the client's event loop; the msgpack `Any` is
narrowed here, and anything malformed is an InvalidResponse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from client.errors import InvalidResponse
from server.models.spec import TensorSpec


@dataclass(frozen=True)
class ModelInfo:
    name: str
    ready: bool
    inputs: tuple[TensorSpec, ...]  # per sample: the batch dimension left out
    outputs: tuple[TensorSpec, ...]
    # As the server reports it: max_batch_size, max_delay_ms, max_queue_size, timeout_ms.
    batching: Mapping[str, float]

    @property
    def max_batch_size(self) -> int:
        return int(self.batching["max_batch_size"])


def parse_listing(obj: Any) -> dict[str, ModelInfo]:
    """The body of `GET /v1/models` to ModelInfo by name, in the server's order."""
    if not isinstance(obj, dict) or not isinstance(obj.get("models"), list):
        raise InvalidResponse("GET /v1/models did not answer a map with a 'models' list")
    infos = [_parse_model(entry) for entry in obj["models"]]
    return {info.name: info for info in infos}


def _parse_model(entry: Any) -> ModelInfo:
    try:
        batching = entry["batching"]
        max_batch = batching["max_batch_size"]
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch_size {max_batch!r}")
        return ModelInfo(
            name=str(entry["name"]),
            ready=bool(entry.get("ready", True)),
            inputs=tuple(TensorSpec.from_wire(s) for s in entry["inputs"]),
            outputs=tuple(TensorSpec.from_wire(s) for s in entry["outputs"]),
            batching={str(k): _number(v) for k, v in batching.items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
        raise InvalidResponse(f"GET /v1/models holds a malformed model entry: {exc!r}") from None


def _number(value: Any) -> float:
    # Integers stay integers so that settings print as the server wrote them.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"batching setting {value!r} is not a number")
    return value
