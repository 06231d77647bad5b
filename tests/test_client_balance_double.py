"""The client over several endpoints, against scripted stand-in servers (tests/test_client_double
.py's Double, real aiohttp servers on 127.0.0.1): a 503 overloaded goes to another endpoint at
once, an endpoint that refuses or is going away is skipped, probes ask every endpoint, a
resolved name keeps its Host header.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from aiohttp import web

import client
from client import Client, RetryPolicy
from tests.test_client_double import Double, answer_echo, error, samples

FAST_RETRY = RetryPolicy(max_retries=3, backoff_initial_s=0.001, backoff_max_s=0.01)


def always(status: int, code: str, headers: dict[str, str] | None = None) -> Any:
    async def answer(double: Double, body: dict[str, Any]) -> web.Response:
        return error(status, code, f"always {code}", headers)

    return answer


@contextmanager
def closed_port() -> Iterator[str]:
    """The URL of a port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_overloaded_goes_to_another_endpoint_at_once_whatever_its_retry_after() -> None:
    # A Retry-After of 30 s on a call of 5 s: with one endpoint the call gives up (see
    # test_no_retry_that_would_end_past_the_calls_timeout); with two it goes to the other.
    with (
        Double(always(503, "overloaded", {"Retry-After": "30"})) as full,
        Double(answer_echo) as free,
        Client([full.url, free.url], retry=FAST_RETRY, timeout_s=5) as mb,
    ):
        for i in range(20):
            np.testing.assert_array_equal(mb.predict("echo", samples(1, i)), samples(1, i))
    assert len(free.hits) == 20
    assert len(full.hits) > 0  # chosen first about half of the time, then passed over
    assert {hit.body["id"] for hit in full.hits} <= {hit.body["id"] for hit in free.hits}


@pytest.mark.parametrize("code", ["shutting_down", "not_ready"])
def test_an_endpoint_going_away_is_skipped_for_a_while(code: str) -> None:
    with (
        Double(always(503, code)) as leaving,
        Double(answer_echo) as staying,
        Client([leaving.url, staying.url], retry=FAST_RETRY) as mb,
    ):
        for i in range(30):
            mb.predict("echo", samples(1, i))
    assert len(staying.hits) == 30
    # Skipped 1 s after its first 503, 2 s after its second: 30 calls on loopback take far less.
    assert 1 <= len(leaving.hits) <= 2


def test_a_refused_endpoint_is_passed_over_and_probes_ask_every_endpoint() -> None:
    with closed_port() as refusing, Double(answer_echo) as up:
        with Client([refusing, up.url], retry=FAST_RETRY) as mb:
            for i in range(30):
                mb.predict("echo", samples(1, i))
            assert mb.health() and mb.ready()  # one endpoint up is enough
        assert len(up.hits) == 30
        with closed_port() as other, Client([refusing, other], retry=FAST_RETRY) as mb:
            assert not mb.health() and not mb.ready()
            with pytest.raises(client.ConnectError):
                mb.predict("echo", samples(1))


def test_without_retries_several_endpoints_change_nothing() -> None:
    with (
        Double(always(503, "overloaded")) as full,
        Client([full.url, full.url], retry=None) as mb,
        pytest.raises(client.Overloaded),
    ):
        mb.predict("echo", samples(1))
    assert len(full.hits) == 1


def test_a_resolved_name_is_sent_in_the_host_header() -> None:
    async def loopback(host: str, port: int) -> list[str]:
        assert host == "mb.test"
        return ["127.0.0.1"]

    with Double(answer_echo) as double:
        port = double.url.rsplit(":", 1)[1]
        with Client(f"http://mb.test:{port}", resolve_every_s=30, resolver=loopback) as mb:
            mb.predict("echo", samples(2))
    assert [hit.host for hit in double.hits] == [f"mb.test:{port}"]
