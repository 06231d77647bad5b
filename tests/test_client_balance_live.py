"""Client-side balancing against three real `microbatch serve` processes on loopback: one
replica ten times slower per sample gets few requests; one stopped mid-run by SIGTERM (drain)
fails none.

The servers listen on 127.0.0.1, 127.0.0.2 and 127.0.0.3 on one port, as a Kubernetes headless
Service's pods would, and the client finds them through one name and an injected resolver (no
DNS server). Which server answered is read from each server's own /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from client import AsyncClient
from tests.conftest import request
from tests.fault_models import Burn, save
from tests.probes import metric, wait_for
from tests.server_process import ServerProcess, start_server

log = logging.getLogger(__name__)
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
# 256x256 matrix products per sample: ten times the work, and enough of it that the model
# outweighs the HTTP overhead even on a loaded machine (so the slow one is ten times slower
# per request, not only per model call).
FAST_ROUNDS, SLOW_ROUNDS = 5, 50


def ready(server: ServerProcess) -> bool:
    try:
        return request(server.url, "GET", "/readyz", timeout_s=5)[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def three_servers(*per_server: Sequence[str]) -> Iterator[tuple[int, list[ServerProcess]]]:
    """One server per loopback address, all on the port the first one was given."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(start_server(*per_server[0], "--host", HOSTS[0]))
        assert first.url, first.log()
        port = urllib.parse.urlsplit(first.url).port
        assert port is not None
        servers = [first]
        for host, args in zip(HOSTS[1:], per_server[1:], strict=True):
            # The first server holds 127.0.0.1:port, so no wildcard socket can hold the port.
            server = start_server(*args, "--host", host, "--port", str(port), wait_ready=False)
            servers.append(stack.enter_context(server))
        for server in servers:
            wait_for(lambda s=server: ready(s), 120, f"{server.url} ready")  # type: ignore[misc]
        yield port, servers


async def loopback_trio(host: str, port: int) -> list[str]:
    assert host == "mb.test"
    return HOSTS


def answered(server: ServerProcess, model: str) -> int:
    return int(metric(server, f'microbatch_requests_total{{code="ok",model="{model}"}}'))


@pytest.fixture(scope="module")
def fast_fast_slow(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, list[ServerProcess]]]:
    folder = tmp_path_factory.mktemp("burn")
    fast = save(Burn(FAST_ROUNDS), folder / "fast.pt")
    slow = save(Burn(SLOW_ROUNDS), folder / "slow.pt")

    def args(path: Path) -> list[str]:
        return ["--model", f"burn={path}:float32[2]", "--cpu-workers", "1"]

    with three_servers(args(fast), args(fast), args(slow)) as trio:
        yield trio


@pytest.mark.slow
async def test_a_replica_ten_times_slower_gets_under_15_percent_of_the_requests(
    fast_fast_slow: tuple[int, list[ServerProcess]],
) -> None:
    port, servers = fast_fast_slow
    n = 600
    xs = [np.array([i, 1], np.float32) for i in range(n)]
    async with AsyncClient(
        f"http://mb.test:{port}", resolve_every_s=60.0, resolver=loopback_trio, timeout_s=120
    ) as mb:
        ys = await mb.predict_many("burn", xs, concurrency=16)
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_array_equal(y, 2 * x)
    counts = [answered(s, "burn") for s in servers]
    per_sample_ms = [
        1000
        * metric(s, "microbatch_batch_compute_seconds_sum")
        / metric(s, "microbatch_batch_samples_total")
        for s in servers
    ]
    figures = f"answers per server {counts}, model ms per sample {per_sample_ms}"
    log.info(figures)
    assert sum(counts) == n, figures
    assert counts[2] < 0.15 * n, figures
    assert min(counts[:2]) > 0.3 * n, figures  # the fast two share the rest


@pytest.mark.slow
async def test_a_replica_stopped_mid_run_fails_no_request() -> None:
    args = ["--model", "linear", "--cpu-workers", "1"]
    with three_servers(args, args, args) as (port, servers):
        urls = [f"http://{host}:{port}" for host in HOSTS]
        stopping = servers[1]
        exit_code: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done, after_stop, failures = 0, 0, list[BaseException]()
        x = np.arange(10, dtype=np.float32)

        async def one_client(mb: AsyncClient) -> None:
            nonlocal done, after_stop
            # At least 1,500 requests, of which 300 after the stopped server has exited.
            while done < 1500 or after_stop < 300:
                try:
                    await mb.predict("linear", x)
                except Exception as exc:  # every failure is the test's finding
                    failures.append(exc)
                done += 1
                after_stop += exit_code.done()
                if done == 500:  # SIGTERM, then wait for the drain and the exit
                    stop = asyncio.ensure_future(asyncio.to_thread(stopping.stop))
                    stop.add_done_callback(lambda f: exit_code.set_result(f.result()))

        async with AsyncClient(urls, timeout_s=60) as mb:
            await asyncio.wait_for(asyncio.gather(*(one_client(mb) for _ in range(16))), 240)
        served_by_others = answered(servers[0], "linear") + answered(servers[2], "linear")
        figures = (
            f"{done} requests, {len(failures)} failed, {done - served_by_others} answered by "
            f"the stopped server, stop exit code {exit_code.result()}"
        )
        log.info(figures)
        assert not failures, f"{figures}: {failures[:5]}"
        assert exit_code.result() == 0, stopping.log()
        assert 0 < done - served_by_others < done  # it served some before it went
