"""A Locust user for microbatch: msgpack over /v1, with the server's own report beside Locust's.

    locust -f scripts/locustfile.py --host http://127.0.0.1:8000 --model mlp --samples 4

Runs inside Locust (`pip install "microbatch[locust]"`), which patches the standard library with
gevent on import: load it only through `locust`, never import it from the client or the server.
Each user sends its next request when its last is answered (users = requests in flight). Every
answer's `batch_size`, `queue_ms` and `compute_ms` are reported as extra request events of type
`server`, so Locust's tables, CSV files and charts show them as rows of their own (the
`batch_size` row's "response times" are samples, not milliseconds).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from locust import FastHttpUser, constant, events, task
from locust.contrib.fasthttp import FastResponse

from client.errors import MicrobatchError
from client.model_info import ModelInfo, parse_listing
from client.wire import (
    ACCEPT_MSGPACK,
    MSGPACK_HEADERS,
    decode_body,
    decode_error,
    decode_infer,
    encode_inputs,
)
from server.protocol.codec import MSGPACK, encode

_EVERY_STATUS = frozenset(range(100, 600))


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument(
        "--model", default="linear", include_in_web_ui=True, help="the served model to load"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        include_in_web_ui=True,
        help="samples per request (at most the model's max_batch_size)",
    )
    parser.add_argument(
        "--timeout-ms",
        type=float,
        default=0.0,
        include_in_web_ui=True,
        help="each request's timeout_ms (0: the model's own default)",
    )


def sample_inputs(info: ModelInfo, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs of `samples` samples for every input of the model, in its dtypes."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in info.inputs:
        shape = (samples, *spec.shape)
        if spec.np_dtype.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.np_dtype)
        else:  # integers and bools: small values every dtype holds
            inputs[spec.name] = rng.integers(0, 2, shape).astype(spec.np_dtype)
    return inputs


class MicrobatchUser(FastHttpUser):
    """One client in a closed loop: POST /v1/models/{model}/infer in msgpack, again and again."""

    wait_time = constant(0)

    def on_start(self) -> None:
        # Every status is an answer judged below. geventhttpclient raises on a status outside
        # this set and, building its message, decodes the body as text: a msgpack error body
        # then fails there (UnicodeDecodeError) and Locust never records the request.
        self.client.client.valid_response_codes = _EVERY_STATUS  # type: ignore[misc]
        options = self.environment.parsed_options
        self.model: str = options.model
        self.path = f"/v1/models/{self.model}/infer"
        self.timeout_ms: float = options.timeout_ms
        info = self._model_info()
        if not 1 <= options.samples <= info.max_batch_size:
            raise ValueError(
                f"--samples must be between 1 and {self.model}'s max_batch_size "
                f"({info.max_batch_size}), got {options.samples}"
            )
        self.tensors = encode_inputs(sample_inputs(info, options.samples, id(self)))

    def _model_info(self) -> ModelInfo:
        reply = self.client.get("/v1/models", headers=ACCEPT_MSGPACK)
        if reply.status_code != 200:
            raise RuntimeError(f"GET /v1/models answered HTTP {reply.status_code}")
        body = decode_body(reply.content or b"", _content_type(reply), "/v1/models")
        listing = parse_listing(body)
        if self.model not in listing:
            raise ValueError(f"the server does not serve {self.model!r}: {sorted(listing)}")
        return listing[self.model]

    @task
    def infer(self) -> None:
        request_id = uuid.uuid4().hex
        body: dict[str, Any] = {"inputs": self.tensors, "id": request_id}
        if self.timeout_ms > 0:
            body["timeout_ms"] = self.timeout_ms
        with self.client.post(
            self.path,
            # Locust's annotation leaves bytes out; its docstring and geventhttpclient take them.
            data=encode(body, MSGPACK),  # type: ignore[arg-type]
            headers=MSGPACK_HEADERS,
            name=self.path,
            catch_response=True,
        ) as response:
            content_type = _content_type(response)
            if response.status_code != 200:
                error = decode_error(
                    response.status_code,
                    content_type,
                    response.content or b"",
                    None,
                )
                # The code alone, so that Locust's error report groups failures by kind.
                response.failure(f"HTTP {response.status_code} {error.code}")
                return
            try:
                _, info = decode_infer(response.content, content_type, request_id)
            except MicrobatchError as exc:
                response.failure(str(exc))
                return
            response.success()
        for name, value in (
            ("batch_size", info.batch_size),
            ("queue_ms", info.queue_ms),
            ("compute_ms", info.compute_ms),
        ):
            self.environment.events.request.fire(
                request_type="server",
                name=name,
                response_time=value,
                response_length=0,
                exception=None,
                context={},
            )


def _content_type(response: FastResponse) -> str:
    value = response.headers.get("Content-Type") if response.headers else None
    return value if isinstance(value, str) else ""
