"""scripts/locustfile.py driven by Locust itself, headless, against a real server process.

Locust patches the standard library with gevent when it is imported, so it runs as a subprocess
(`locust` beside this interpreter, from the `locust` extra) and never inside pytest. Its final
statistics come back as JSON (`--json`), and its exit code is 1 when any request failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server_process import ROOT, ServerProcess, start_server

LOCUST = Path(sys.executable).parent / "locust"
USERS = 32
pytestmark = pytest.mark.skipif(
    not LOCUST.exists(), reason='needs the locust extra: pip install -e ".[dev,locust]"'
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with start_server("--model", "linear", "--model", "mlp", "--max-batch-size", "32") as process:
        assert process.url, process.log()
        yield process


def run_locust(url: str, *options: str) -> tuple[int, list[dict[str, Any]], str]:
    """Exit code, final statistics (one entry per type and name) and Locust's log."""
    headless = ["--headless", "-u", str(USERS), "-r", str(USERS), "-t", "3s"]
    output = ["--json", "--only-summary", "--loglevel", "WARNING"]
    done = subprocess.run(
        [str(LOCUST), "-f", "scripts/locustfile.py", "--host", url, *headless, *output, *options],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    stats = json.loads(done.stdout) if done.stdout.strip() else []
    return done.returncode, stats, done.stderr


def by_name(stats: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(entry["method"], entry["name"]): entry for entry in stats}


@pytest.mark.parametrize(("model", "samples"), [("linear", 1), ("mlp", 4)])
def test_headless_run_has_no_failures_and_reports_the_servers_timings(
    server: ServerProcess, model: str, samples: int
) -> None:
    code, stats, log = run_locust(server.url, "--model", model, "--samples", str(samples))
    assert code == 0, log
    entries = by_name(stats)
    infer = entries["POST", f"/v1/models/{model}/infer"]
    assert infer["num_requests"] > 0, log
    assert sum(entry["num_failures"] for entry in stats) == 0, log
    for name in ("batch_size", "queue_ms", "compute_ms"):
        extra = entries["server", name]
        assert extra["num_failures"] == 0
        # One event per answer; a user stopped between its answer and its events loses them.
        assert infer["num_requests"] - USERS <= extra["num_requests"] <= infer["num_requests"]
    batch_sizes = {int(size) for size in entries["server", "batch_size"]["response_times"]}
    assert min(batch_sizes) >= samples  # a batch holds at least this request's samples
    assert max(batch_sizes) <= 32  # and never more than max_batch_size


def test_server_errors_are_locust_failures_with_the_servers_words(server: ServerProcess) -> None:
    # A per-request deadline far too short for any batch: every answer is a
    # 504 (or a 503 at admission), never a success.
    code, stats, log = run_locust(server.url, "--model", "mlp", "--timeout-ms", "0.001")
    assert code == 1, log
    infer = by_name(stats)["POST", "/v1/models/mlp/infer"]
    assert infer["num_failures"] == infer["num_requests"] > 0
    assert "deadline_exceeded" in log or "overloaded" in log, log
