"""The one error tree of the server; each class carries its wire code, HTTP status and retryability.

Pure Python (no aiohttp, no torch): the protocol codec, the batcher and the client share it.

    ServingError                 code               status  retryable
    ├── BadRequest               bad_request        400
    ├── Unauthorized             unauthorized       401
    ├── UnknownModel             unknown_model      404
    ├── NotFound                 not_found          404
    ├── MethodNotAllowed         method_not_allowed 405
    ├── PayloadTooLarge          payload_too_large  413
    ├── UnsupportedMediaType     unsupported_media_type 415
    ├── ExpectationFailed        expectation_failed 417
    ├── ModelError               model_error        500
    ├── InternalError            internal           500
    ├── Overloaded               overloaded         503     yes (with Retry-After)
    ├── ShuttingDown             shutting_down      503     yes (Retry-After: 1)
    ├── NotReady                 not_ready          503     yes (Retry-After: 1)
    └── DeadlineExceeded         deadline_exceeded  504
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Wire-visible error codes (a str Enum so that it works on Python 3.10 too)."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_MODEL = "unknown_model"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    EXPECTATION_FAILED = "expectation_failed"
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"
    NOT_READY = "not_ready"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class ServingError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL
    http_status: int = 500
    retryable: bool = False
    default_retry_after_s: float | None = None

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Only meaningful on retryable errors; becomes the Retry-After header (whole seconds).
        self.retry_after_s = (
            retry_after_s if retry_after_s is not None else (self.default_retry_after_s)
        )


class BadRequest(ServingError):
    code, http_status = ErrorCode.BAD_REQUEST, 400


class Unauthorized(ServingError):
    code, http_status = ErrorCode.UNAUTHORIZED, 401


class UnknownModel(ServingError):
    code, http_status = ErrorCode.UNKNOWN_MODEL, 404


class NotFound(ServingError):
    code, http_status = ErrorCode.NOT_FOUND, 404


class MethodNotAllowed(ServingError):
    code, http_status = ErrorCode.METHOD_NOT_ALLOWED, 405


class PayloadTooLarge(ServingError):
    code, http_status = ErrorCode.PAYLOAD_TOO_LARGE, 413


class UnsupportedMediaType(ServingError):
    code, http_status = ErrorCode.UNSUPPORTED_MEDIA_TYPE, 415


class ExpectationFailed(ServingError):
    code, http_status = ErrorCode.EXPECTATION_FAILED, 417


class ModelError(ServingError):
    code, http_status = ErrorCode.MODEL_ERROR, 500


class InternalError(ServingError):
    code, http_status = ErrorCode.INTERNAL, 500


class Overloaded(ServingError):
    code, http_status, retryable = ErrorCode.OVERLOADED, 503, True


class ShuttingDown(ServingError):
    code, http_status, retryable = ErrorCode.SHUTTING_DOWN, 503, True
    default_retry_after_s = 1.0  # another replica may take it now; this one, never again


class NotReady(ServingError):
    code, http_status, retryable = ErrorCode.NOT_READY, 503, True
    default_retry_after_s = 1.0


class DeadlineExceeded(ServingError):
    code, http_status = ErrorCode.DEADLINE_EXCEEDED, 504


_BY_CODE: dict[str, type[ServingError]] = {
    cls.code.value: cls
    for cls in (
        BadRequest,
        Unauthorized,
        UnknownModel,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        UnsupportedMediaType,
        ExpectationFailed,
        ModelError,
        InternalError,
        Overloaded,
        ShuttingDown,
        NotReady,
        DeadlineExceeded,
    )
}


def error_for_code(code: str, message: str) -> ServingError:
    """Rebuild an error from its wire code (outcomes and clients carry codes, not classes)."""
    return _BY_CODE.get(code, ServingError)(message)
