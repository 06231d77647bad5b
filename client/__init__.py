"""The Python client of a microbatch server: AsyncClient (primary) and Client (blocking).

    import numpy as np
    from client import Client

    with Client("http://127.0.0.1:8000") as mb:           # or "unix:///run/microbatch.sock"
        y = mb.predict("linear", np.ones(10, np.float32))  # one sample -> the output array
        p = mb.predict("mlp", np.ones((1000, 256), np.float32), return_info=True)
        print(p.output.shape, p.device, p.queue_ms, p.compute_ms)

Runs in the caller's process, on the caller's event loop (AsyncClient) or on a private loop
thread (Client). Imports neither torch nor aiohttp.web; errors are drawn in client/errors.py.
"""

from client.async_client import AsyncClient
from client.errors import (
    BadRequest,
    ConnectError,
    DeadlineExceeded,
    Disconnected,
    ExpectationFailed,
    InternalError,
    InvalidResponse,
    MethodNotAllowed,
    MicrobatchError,
    ModelError,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    ShuttingDown,
    Timeout,
    TransportError,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
)
from client.model_info import ModelInfo
from client.prediction import Prediction, RequestInfo
from client.retry import RetryPolicy
from client.sync_client import Client

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "ConnectError",
    "DeadlineExceeded",
    "Disconnected",
    "ExpectationFailed",
    "InternalError",
    "InvalidResponse",
    "MethodNotAllowed",
    "MicrobatchError",
    "ModelError",
    "ModelInfo",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "Prediction",
    "RequestInfo",
    "RetryPolicy",
    "ServerError",
    "ShuttingDown",
    "Timeout",
    "TransportError",
    "Unauthorized",
    "UnknownModel",
    "UnsupportedMediaType",
]
