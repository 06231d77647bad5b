"""What the client raises: one class per server error code, and transport failures apart.

Runs wherever the client runs (any thread, any event loop); pure Python, no aiohttp.

    MicrobatchError              anything this client raises on purpose
    ├── ServerError              the server answered with an error (code, message, http_status)
    │   ├── BadRequest           bad_request              400  (also raised locally, before sending)
    │   ├── Unauthorized         unauthorized             401
    │   ├── UnknownModel         unknown_model            404
    │   ├── NotFound             not_found                404
    │   ├── MethodNotAllowed     method_not_allowed       405
    │   ├── PayloadTooLarge      payload_too_large        413
    │   ├── UnsupportedMediaType unsupported_media_type   415
    │   ├── ExpectationFailed    expectation_failed       417
    │   ├── ModelError           model_error              500
    │   ├── InternalError        internal                 500
    │   ├── Overloaded           overloaded               503  retried (honours Retry-After)
    │   ├── ShuttingDown         shutting_down            503  retried
    │   ├── NotReady             not_ready                503  retried
    │   └── DeadlineExceeded     deadline_exceeded        504  (also a TimeoutError)
    └── TransportError           no usable answer came back
        ├── ConnectError         could not connect (refused, no such socket), or a reused
        │                        keep-alive connection closed before any answer: retried
        ├── Disconnected         a new connection closed before any answer: retried only on
        │                        another endpoint (the server may have failed on this request)
        ├── Timeout              the call's time ran out on this side (also a TimeoutError)
        └── InvalidResponse      an answer that is not the protocol (bad body, wrong request id)

An error code this client does not know becomes a plain ServerError that keeps the code.
"""

from __future__ import annotations

from server.errors import ErrorCode


class MicrobatchError(Exception):
    """The root of every error this client raises on purpose."""


class ServerError(MicrobatchError):
    """The server (or the client's local check, with the server's words) refused the request."""

    retryable = False

    def __init__(
        self,
        code: str,
        message: str,
        http_status: int,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message
        self.http_status = http_status
        # The server's Retry-After, in seconds, where it sent one.
        self.retry_after_s = retry_after_s


class BadRequest(ServerError):
    pass


class Unauthorized(ServerError):
    pass


class UnknownModel(ServerError):
    pass


class NotFound(ServerError):
    pass


class MethodNotAllowed(ServerError):
    pass


class PayloadTooLarge(ServerError):
    pass


class UnsupportedMediaType(ServerError):
    pass


class ExpectationFailed(ServerError):
    pass


class ModelError(ServerError):
    pass


class InternalError(ServerError):
    pass


class Overloaded(ServerError):
    retryable = True


class ShuttingDown(ServerError):
    retryable = True


class NotReady(ServerError):
    retryable = True


class DeadlineExceeded(ServerError, TimeoutError):
    pass


class TransportError(MicrobatchError):
    """No usable answer: the connection failed, the time ran out, or the reply was not valid."""

    retryable = False


class ConnectError(TransportError):
    """No answer began: the connection could not be made (the request was never sent), or a
    pooled keep-alive connection was closed or reset by the server before one byte of an answer
    came (`stale`; client/transport.py says why a retry is safe). Retried."""

    retryable = True

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


class Disconnected(TransportError):
    """The server closed or reset a new connection before one byte of an answer: it may have
    read this request and failed on it, so it is never sent to the same endpoint again; a
    client of several endpoints retries it on another (inference requests are safe to repeat)."""


class Timeout(TransportError, TimeoutError):
    """The call's own time (timeout_s) ran out before an answer came."""


class InvalidResponse(TransportError):
    """The server answered something that is not the protocol (or not for this request)."""


ERROR_CLASSES: dict[str, type[ServerError]] = {
    ErrorCode.BAD_REQUEST.value: BadRequest,
    ErrorCode.UNAUTHORIZED.value: Unauthorized,
    ErrorCode.UNKNOWN_MODEL.value: UnknownModel,
    ErrorCode.NOT_FOUND.value: NotFound,
    ErrorCode.METHOD_NOT_ALLOWED.value: MethodNotAllowed,
    ErrorCode.PAYLOAD_TOO_LARGE.value: PayloadTooLarge,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE.value: UnsupportedMediaType,
    ErrorCode.EXPECTATION_FAILED.value: ExpectationFailed,
    ErrorCode.MODEL_ERROR.value: ModelError,
    ErrorCode.INTERNAL.value: InternalError,
    ErrorCode.OVERLOADED.value: Overloaded,
    ErrorCode.SHUTTING_DOWN.value: ShuttingDown,
    ErrorCode.NOT_READY.value: NotReady,
    ErrorCode.DEADLINE_EXCEEDED.value: DeadlineExceeded,
}


def server_error(
    code: str, message: str, http_status: int, retry_after_s: float | None = None
) -> ServerError:
    """The exception for a wire error code; an unknown code gives the base class, code kept."""
    cls = ERROR_CLASSES.get(code, ServerError)
    return cls(code, message, http_status, retry_after_s=retry_after_s)
