"""One request as the generator saw it, and the parsing of the server's answer into it.

Plain data made on the generator's event loop and pickled from worker processes to the CLI
process; no aiohttp here. Times are seconds from the run's start on the monotonic clock.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import msgpack

NO_ANSWER = 0  # `status` of a request that got no HTTP response
# Codes of requests that got no HTTP response, beside the server's own error codes.
CLIENT_TIMEOUT = "client_timeout"
CONNECTION_ERROR = "connection_error"
UNFINISHED = "unfinished"  # still in flight when the run's drain time ran out
BAD_ANSWER = "bad_answer"  # a 200 whose body was not a msgpack map
NAN = math.nan


class RequestRecord(NamedTuple):
    phase: int  # index into the run's phases
    scheduled_s: float  # when it was due; latency counts from here (no coordinated omission)
    dispatched_s: float  # when the generator's schedule loop released it: > scheduled_s when
    # the generator itself ran late (its own CPU), which the report flags
    sent_s: float  # when a connection took it: > dispatched_s while every connection was busy
    done_s: float  # when the whole answer had arrived (NAN if it never did)
    status: int  # HTTP status, or NO_ANSWER
    code: str  # "" for success; the server's error code; or one of the client codes above
    batch_size: int  # the server's batch_size (0 when unknown)
    device: str
    queue_ms: float
    compute_ms: float

    @property
    def latency_ms(self) -> float:
        return (self.done_s - self.scheduled_s) * 1000.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.code


def from_answer(
    phase: int,
    scheduled_s: float,
    dispatched_s: float,
    sent_s: float,
    done_s: float,
    status: int,
    body: bytes,
) -> RequestRecord:
    """A record from an HTTP answer: the batching fields on success, the error code otherwise."""
    try:
        obj: Any = msgpack.unpackb(body, raw=False)
    except Exception:  # any undecodable body is the server's fault, recorded, not raised
        obj = None
    if status != 200:
        error = obj.get("error") if isinstance(obj, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        code = str(code) if code else f"http_{status}"
        return RequestRecord(
            phase, scheduled_s, dispatched_s, sent_s, done_s, status, code, 0, "", NAN, NAN
        )
    if not isinstance(obj, dict):
        return RequestRecord(
            phase, scheduled_s, dispatched_s, sent_s, done_s, status, BAD_ANSWER, 0, "", NAN, NAN
        )
    return RequestRecord(
        phase,
        scheduled_s,
        dispatched_s,
        sent_s,
        done_s,
        status,
        "",
        _int(obj.get("batch_size")),
        str(obj.get("device", "")),
        _float(obj.get("queue_ms")),
        _float(obj.get("compute_ms")),
    )


def failed(
    phase: int, scheduled_s: float, dispatched_s: float, sent_s: float, done_s: float, code: str
) -> RequestRecord:
    """A record of a request that got no HTTP answer."""
    return RequestRecord(
        phase, scheduled_s, dispatched_s, sent_s, done_s, NO_ANSWER, code, 0, "", NAN, NAN
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return NAN
