"""The client's pure parts with plain numbers: retry policy, Retry-After, URLs, input checks,
splitting and joining, and the error table. No server, no sleeps.
"""

from __future__ import annotations

import email.utils

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import client
import server.errors
from client.errors import ERROR_CLASSES, server_error
from client.inputs import join, named_inputs, split
from client.retry import RetryPolicy, parse_retry_after, retry_delay_s
from client.transport import Address
from client.wire import decode_error
from server.errors import ErrorCode

POLICY = RetryPolicy(max_retries=4, backoff_initial_s=0.1, backoff_max_s=0.5)


def test_backoff_grows_exponentially_within_jitter_and_is_capped() -> None:
    lows = [retry_delay_s(POLICY, n, None, 100.0, 0.0) for n in range(4)]
    highs = [retry_delay_s(POLICY, n, None, 100.0, 0.999999) for n in range(4)]
    assert lows == pytest.approx([0.05, 0.1, 0.2, 0.25])
    assert highs == pytest.approx([0.1, 0.2, 0.4, 0.5])


def test_retries_are_bounded_and_none_turns_them_off() -> None:
    assert retry_delay_s(POLICY, 4, None, 100.0, 0.5) is None
    assert retry_delay_s(None, 0, None, 100.0, 0.5) is None
    assert retry_delay_s(RetryPolicy(max_retries=0), 0, None, 100.0, 0.5) is None


def test_retry_after_is_a_floor_and_never_stretches_past_the_deadline() -> None:
    assert retry_delay_s(POLICY, 0, 2.0, 100.0, 0.5) == 2.0
    assert retry_delay_s(POLICY, 3, 0.0, 100.0, 0.0) == pytest.approx(0.25)
    assert retry_delay_s(POLICY, 0, 2.0, 1.9, 0.5) is None  # honouring it would overrun
    assert retry_delay_s(POLICY, 0, None, 0.01, 0.5) is None  # so would the backoff


@given(
    retries_done=st.integers(0, 10),
    retry_after_s=st.none() | st.floats(0, 100),
    remaining_s=st.floats(-1, 100),
    uniform=st.floats(0, 1, exclude_max=True),
)
def test_a_retry_never_waits_past_the_deadline_nor_less_than_retry_after(
    retries_done: int, retry_after_s: float | None, remaining_s: float, uniform: float
) -> None:
    delay = retry_delay_s(POLICY, retries_done, retry_after_s, remaining_s, uniform)
    if delay is None:
        return
    assert retries_done < POLICY.max_retries
    assert 0 <= delay < remaining_s
    assert delay >= (retry_after_s or 0.0)
    assert delay <= max(POLICY.backoff_max_s, retry_after_s or 0.0)


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="backoff_initial_s"):
        RetryPolicy(backoff_initial_s=3.0, backoff_max_s=1.0)


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 7, usegmt=True), now) == 7.0
    assert parse_retry_after(email.utils.formatdate(now - 7, usegmt=True), now) == 0.0
    for bad in (None, "soon", "-1", "nan"):
        assert parse_retry_after(bad, now) is None


def test_urls() -> None:
    assert Address.parse("http://127.0.0.1:8000/") == Address("http://127.0.0.1:8000")
    assert Address.parse("unix:///run/mb.sock") == Address("http://localhost", "/run/mb.sock")
    for bad in ("127.0.0.1:8000", "ftp://x", "unix://", "http://"):
        with pytest.raises(ValueError, match="URL"):
            Address.parse(bad)


def test_inputs_become_c_contiguous_and_keep_their_values() -> None:
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    strided = np.arange(20, dtype=np.int64)[::2]
    swapped = np.arange(4, dtype=">f4")
    named = named_inputs({"f": fortran, "s": strided, "b": swapped})
    for name, original in (("f", fortran), ("s", strided), ("b", swapped)):
        assert named[name].flags.c_contiguous
        np.testing.assert_array_equal(named[name], original)
    assert list(named_inputs(np.zeros(3, np.float32))) == ["input"]


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros(3, np.complex64), "inputs.input.dtype must be one of float16, float32, "),
        ({"a": np.array(["x"])}, "inputs.a.dtype must be one of"),
        ({}, "'inputs' must be a non-empty map"),
        ({1: np.zeros(2)}, "input names must be strings"),
    ],
)
def test_unsendable_inputs_are_refused_before_sending(x: object, message: str) -> None:
    with pytest.raises(client.BadRequest, match=message) as info:
        named_inputs(x)  # type: ignore[arg-type]
    assert (info.value.code, info.value.http_status) == ("bad_request", 400)


def test_split_and_join_keep_sample_order() -> None:
    batched = {"a": np.arange(10 * 3).reshape(10, 3), "b": np.arange(10)}
    parts = split(batched, 10, 4)
    assert [len(part["b"]) for part in parts] == [4, 4, 2]
    assert all(part["a"].flags.c_contiguous for part in parts)
    joined = join(parts)
    np.testing.assert_array_equal(joined["a"], batched["a"])
    np.testing.assert_array_equal(joined["b"], batched["b"])


@given(samples=st.integers(1, 300), size=st.integers(1, 70))
def test_split_parts_are_bounded_and_join_back_in_order(samples: int, size: int) -> None:
    batched = {"a": np.arange(samples * 2).reshape(samples, 2)}
    parts = split(batched, samples, size)
    assert len(parts) == -(-samples // size)
    assert all(1 <= len(part["a"]) <= size for part in parts)
    np.testing.assert_array_equal(join(parts)["a"], batched["a"])


def test_every_server_code_has_a_class_named_like_the_servers() -> None:
    assert set(ERROR_CLASSES) == {code.value for code in ErrorCode}
    for code, cls in ERROR_CLASSES.items():
        assert cls.__name__ == type(server.errors.error_for_code(code, "")).__name__
        assert cls.retryable == server.errors.error_for_code(code, "").retryable
        assert getattr(client, cls.__name__) is cls
    assert type(server_error("no_such_code", "m", 418)) is client.ServerError


def test_error_bodies_decode_to_their_class_with_retry_after() -> None:
    body = msgpack.packb({"error": {"code": "overloaded", "message": "full"}})
    err = decode_error(503, "application/msgpack", body, "2")
    assert isinstance(err, client.Overloaded)
    assert (err.message, err.http_status, err.retry_after_s) == ("full", 503, 2.0)
    json_err = decode_error(
        404, "application/json", b'{"error":{"code":"not_found","message":"x"}}', None
    )
    assert isinstance(json_err, client.NotFound)
    plain = decode_error(502, "text/plain", b"upstream gone", None)
    assert (type(plain), plain.code, plain.message) == (
        client.ServerError,
        "http_502",
        "HTTP 502: upstream gone",
    )
