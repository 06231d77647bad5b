"""The drain drops nothing that reached the server, against real server processes and SIGTERM:
keep-alive clients see answers, never resets; during the drain every answer carries
`Connection: close`, an idle kept-alive connection may still send (and gets its answer), the
listener stays open and answers 503 shutting_down; server.drain_delay_s keeps serving while
/readyz already says 503.

Load is bounded and goes to 127.0.0.1 only; figures are printed (pytest -s).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import msgpack
import numpy as np

from bench.loadgen.drain_load import drain_under_load
from tests import fault_models
from tests.conftest import request, tensor
from tests.probes import metric, wait_for
from tests.raw_http import closed_by_server, connect, head, read_answer
from tests.server_process import ServerProcess, start_server

LONG = 2000  # rounds of tests/fault_models.Work: several seconds of compute
BOUND_S = 60.0


def work_request(value: float, rounds: int = 0) -> bytes:
    body = msgpack.packb({"inputs": {"x": tensor(np.array([value, rounds], np.float32))}})
    return (
        head(
            "POST",
            "/v1/models/work/infer",
            Content_Type="application/msgpack",
            Content_Length=len(body),
        )
        + body
    )


def readyz(server: ServerProcess) -> int:
    try:
        return request(server.url, "GET", "/readyz", timeout_s=5)[0]
    except OSError:
        return -1


async def test_keepalive_clients_get_an_answer_for_every_request_through_a_drain() -> None:
    with start_server("--model", "linear", "--cpu-workers", "1") as server:
        tally = await drain_under_load(server.url, server.process.pid, clients=48)
        code = await asyncio.to_thread(server.process.wait, BOUND_S)
    print(
        f"\ndrain under 48 keep-alive clients: transport errors {tally.errors} "
        f"{dict(tally.transport_errors)}, answers {dict(tally.answers)}"
    )
    assert code == 0, server.log()[-2000:]
    assert set(tally.answers) <= {"200", "503 shutting_down"}, tally.answers
    assert tally.errors <= 1, tally.transport_errors  # the instant between last accept and close


def test_during_the_drain_answers_close_connections_and_idle_ones_may_still_send(
    tmp_path: Path,
) -> None:
    path = fault_models.save(fault_models.Work(), tmp_path / "work.pt")
    server = start_server("--model", f"work={path}:float32[2]", "--cpu-workers", "1")
    with server, connect(server) as idle, connect(server) as quiet, connect(server) as long:
        for sock in (idle, quiet):  # kept-alive connections that have had an answer
            sock.sendall(work_request(1.0))
            status, headers, _ = read_answer(sock)
            assert status == 200 and headers.get("connection") != "close"
        long.sendall(work_request(2.0, LONG))
        wait_for(lambda: metric(server, "microbatch_busy_workers") >= 1, BOUND_S, "the long one")
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: readyz(server) == 503, BOUND_S, "/readyz 503")

        idle.sendall(work_request(3.0))  # on a connection kept alive from before the signal
        status, headers, body = read_answer(idle)
        assert status == 503 and msgpack.unpackb(body)["error"]["code"] == "shutting_down"
        assert headers["connection"] == "close" and closed_by_server(idle, BOUND_S)
        with connect(server) as new:  # the listener is still open
            new.sendall(work_request(4.0))
            status, headers, _ = read_answer(new)
            assert status == 503 and headers["connection"] == "close"

        status, headers, body = read_answer(long, BOUND_S)  # admitted before: computed
        assert status == 200 and headers["connection"] == "close"
        assert msgpack.unpackb(body)["outputs"]["output"]["shape"] == [2]
        assert closed_by_server(quiet, BOUND_S)  # never sent again: closed after the grace
    assert server.process.wait(BOUND_S) == 0, server.log()[-2000:]


def test_drain_delay_keeps_serving_while_not_ready() -> None:
    env = {"MICROBATCH_SERVER_DRAIN_DELAY_S": "5"}
    with start_server("--model", "linear", "--cpu-workers", "1", env=env) as server:
        x = np.ones(10, np.float32)
        body = msgpack.packb({"inputs": {"x": tensor(x)}})
        infer = (
            head(
                "POST",
                "/v1/models/linear/infer",
                Content_Type="application/msgpack",
                Content_Length=len(body),
            )
            + body
        )
        with connect(server) as kept:
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: readyz(server) == 503, BOUND_S, "/readyz 503")
            status, _, raw = request(server.url, "GET", "/readyz")
            assert status == 503 and b'"shutting_down"' in raw
            kept.sendall(infer)  # within the delay: served as usual, kept alive
            status, headers, _ = read_answer(kept)
            assert status == 200 and headers.get("connection") != "close"
            # After the delay the drain proper begins.
            wait_for(lambda: shutting_down(server, infer), BOUND_S, "503 shutting_down")
        assert server.process.wait(BOUND_S) == 0, server.log()[-2000:]


def shutting_down(server: ServerProcess, infer: bytes) -> bool:
    try:
        with connect(server) as sock:
            sock.sendall(infer)
            status, _, body = read_answer(sock)
    except OSError:
        return False
    return status == 503 and b"shutting_down" in body
