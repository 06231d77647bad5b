"""The load generator against real servers on loopback: the echo server with a controlled
latency (--delay-ms) and capacity (--slots), and the microbatch server itself.

Every server is a subprocess on port 0 (or a Unix socket) waited on with a bounded timeout.
Bounds below are what the target server makes physically true (a 20 ms sleep cannot answer in
under ~19 ms; one slot cannot serve over 50 req/s), with generous room on the other side.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from bench.loadgen.fanout import run_on_loop
from bench.loadgen.loadtest import run_loadtest
from bench.loadgen.plan import CLOSED, OPEN, LoadPlan
from bench.loadgen.progress import ProgressBar
from bench.loadgen.schedule import closed_loop_phases, open_loop_phases
from bench.loadgen.target import parse_target
from bench.suite.servers import ServerProcess, echo_argv, start_server
from client.transport import Transport
from server.cli import main
from tests.server_process import ServerProcess as MicrobatchProcess

pytestmark = pytest.mark.timeout(120)


@contextmanager
def echo(*flags: str) -> Iterator[ServerProcess]:
    server = start_server("echo", echo_argv(*flags), timeout_s=60.0)
    try:
        yield server
    finally:
        server.stop()


def answered_by(url: str) -> int:
    """How many infer requests the echo server says it answered."""

    async def get() -> int:
        transport = Transport(1)
        try:
            reply = await transport.request(
                parse_target(url), "GET", "/stats", headers={}, timeout_s=10.0
            )
        finally:
            await transport.close()
        return int(msgpack.unpackb(reply.body)["answered"])

    return run_on_loop(get)


def run(plan: LoadPlan) -> dict[str, Any]:
    report, _ = run_loadtest(plan, ProgressBar(sys.stderr, False, plan.total_s))
    return report


def open_plan(url: str, rate: float, duration_s: float, model: str = "mlp", **kw: Any) -> LoadPlan:
    phases = open_loop_phases(rate, duration_s, 0.0, None)
    return LoadPlan(url, model, OPEN, phases, arrivals="constant", **kw)


def test_percentiles_and_rates_match_a_20ms_server() -> None:
    with echo("--delay-ms", "20") as server:
        s = run(open_plan(server.url, 40, 1.5))["summary"]
        assert (s["sent"], s["answered"], s["ok"]) == (60, 60, 60)
        assert answered_by(server.url) == 60
    assert 19.0 <= s["latency_ms"]["p50"] <= 40.0
    assert 19.0 <= s["compute_ms"]["p50"] <= 30.0  # the server's own account of its sleep
    assert s["offered_rps"] == 40.0
    assert 36.0 <= s["ok_rps"] <= 40.0  # the last answer may land just after the window
    assert s["batch_size"] == {"1": 60} and s["devices"] == {"echo": 60}


def test_an_overloaded_server_shows_rising_latency() -> None:
    # One slot of 20 ms serves at most 50 req/s; 80 req/s are offered for 2 s.
    with echo("--delay-ms", "20", "--slots", "1") as server:
        report = run(open_plan(server.url, 80, 2.0))
    s = report["summary"]
    assert s["sent"] == 160 and s["ok"] == 160  # the schedule did not slow down to the server
    assert s["ok_rps"] <= 55.0
    trend = [row["p50_ms"] for row in report["latency_over_time"]]
    assert trend[-1] > trend[0] + 300.0  # a backlog of ~60 requests x 20 ms by the end
    assert s["latency_ms"]["p99"] > 800.0 and s["latency_ms"]["p50"] > 200.0
    assert s["queue_ms"]["p99"] > 500.0  # the wait happened in the server, where it belongs


def test_a_closed_loop_waits_its_turn_at_a_one_slot_server() -> None:
    with echo("--delay-ms", "20", "--slots", "1") as server:
        plan = LoadPlan(server.url, "mlp", CLOSED, closed_loop_phases(1.5, 0.3), concurrency=4)
        s = run(plan)["summary"]
    assert s["ok_rps"] <= 55.0
    assert s["latency_ms"]["p50"] >= 60.0  # each of 4 clients waits for the other 3
    assert s["queue_ms"]["p50"] >= 40.0
    assert s["offered_rps"] is None and s["errors_by_code"] == {}


def test_several_processes_over_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    with echo("--uds", str(path)) as server:
        assert server.url == f"unix://{path}"
        s = run(open_plan(server.url, 100, 1.0, processes=2))["summary"]
        assert (s["sent"], s["ok"]) == (100, 100)
        assert answered_by(server.url) == 100


def test_the_report_files_are_written_and_well_formed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = {name: tmp_path / "out" / name for name in ("r.json", "r.md", "r.csv", "plots")}
    with echo("--delay-ms", "2") as server:
        code = main(
            ["loadtest", "--url", server.url, "--model", "linear", "--schedule", "40:0.5,80:0.5",
             "--warmup", "0.2", "--arrivals", "constant", "--no-progress",
             "--json", str(out["r.json"]), "--markdown", str(out["r.md"]),
             "--records", str(out["r.csv"]), "--plot", str(out["plots"])]
        )  # fmt: skip
    assert code == 0
    assert "latency ms: p50" in capsys.readouterr().out
    report = json.loads(out["r.json"].read_text())
    assert [p["offered_rps"] for p in report["phases"]] == [40, 80]
    assert report["summary"]["sent"] == 60 and report["settings"]["model"] == "linear"
    assert report["meta"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [10]}]
    markdown = out["r.md"].read_text()
    assert markdown.startswith("# Load test: linear") and "| phase 2 | 40 |" in markdown
    rows = out["r.csv"].read_text().splitlines()
    assert rows[0].startswith("phase,scheduled_s") and len(rows) == 1 + 60 + 8  # with warm-up
    import matplotlib.image

    for name in ("load.png", "latency_cdf.png", "batch_sizes.png", "latency_over_time.png"):
        png = out["plots"] / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png).shape[2] in (3, 4)


def test_client_timeouts_are_counted_by_code() -> None:
    with echo("--delay-ms", "400") as server:
        s = run(open_plan(server.url, 20, 0.5, client_timeout_s=0.1))["summary"]
    assert s["errors_by_code"] == {"client_timeout": 10}
    assert s["by_status"] == {"no_answer": 10} and s["ok"] == 0
    assert s["latency_ms"]["p50"] is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unknown_models_unreachable_servers_and_bad_flags_fail_cleanly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with echo() as server:
        assert main(["loadtest", "--url", server.url, "--model", "nope", "--rate", "5"]) == 1
    assert "no model 'nope'; it serves: linear, mlp" in capsys.readouterr().err
    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["loadtest", "--url", url, "--model", "mlp", "--rate", "5"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert main(["loadtest", "--url", url, "--model", "m", "--schedule", "5"]) == 2
    assert main(["loadtest", "--url", "localhost:1", "--model", "m", "--rate", "5"]) == 2


@pytest.mark.slow
def test_against_the_microbatch_server(default_server: MicrobatchProcess) -> None:
    url = default_server.url
    closed = LoadPlan(url, "linear", CLOSED, closed_loop_phases(1.0, 0.2), concurrency=8)
    s = run(closed)["summary"]
    assert s["ok"] == s["sent"] > 0 and s["devices"] == {"cpu": s["ok"]}
    assert all(1 <= int(size) <= 32 for size in s["batch_size"])
    assert s["compute_ms"]["p50"] is not None and s["queue_ms"]["p50"] is not None
    too_big = open_plan(url, 20, 0.5, "linear", samples_per_request=100)  # max_batch_size 32
    s = run(too_big)["summary"]
    assert s["errors_by_code"] == {"bad_request": 10} and s["by_status"] == {"400": 10}
