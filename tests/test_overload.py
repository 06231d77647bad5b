"""No congestion collapse: at twice the saturation rate (open loop), the server keeps answering
admitted requests at (nearly) the saturation throughput within their deadline, sheds the rest
early with 503 overloaded + Retry-After, and its memory stays bounded.

A real server process with one CPU worker and a model whose batch costs a fixed ~90 ms; the
saturation rate is measured in the same run (closed loop), then the open-loop load runs at
twice that for a few seconds. All of it goes to 127.0.0.1, bounded in count and time. Deadline
checks use the server's own report (queue_ms + compute_ms), not the test's clock.

On a shared machine the model itself may run slower in one phase than the other (other
processes take the cores); goodput is compared after scaling by the model's own batch time in
each phase (compute_ms, as the worker measured it), which congestion collapse cannot change:
collapse shows as capacity spent on late or shed work, not as a slower model.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests import fault_models
from tests.probes import Answer, rss_bytes, send, tally, work
from tests.server_process import ServerProcess, start_server

ROUNDS = 40  # tests/fault_models.Work: ~90 ms per batch, whatever its size
TIMEOUT_MS = 1000.0
SATURATION_S = 3.0
OVERLOAD_S = 4.0


def in_time(answer: Answer) -> bool:
    body = answer.body
    return answer.status == 200 and body["queue_ms"] + body["compute_ms"] <= TIMEOUT_MS


async def closed_loop(url: str, seconds: float, concurrency: int) -> tuple[list[Answer], float]:
    """`concurrency` clients each sending as soon as answered; the answers and the time."""
    answers: list[Answer] = []
    async with aiohttp.ClientSession() as session:
        end = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < end:
                answers.append(await send(session, url, "work", work(1.0, ROUNDS)))

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return answers, time.monotonic() - started


def batch_ms(answers: list[Answer]) -> float:
    return statistics.median(a.body["compute_ms"] for a in answers if a.status == 200)


async def open_loop(url: str, rate: float, seconds: float) -> tuple[list[Answer], float]:
    """Sends at `rate` whatever the answers; returns them and the time to the last one."""
    count = int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        tasks = []
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(send(session, url, "work", work(float(i), ROUNDS))))
        answers = await asyncio.gather(*tasks)
        return list(answers), time.monotonic() - started


@dataclass
class Trial:
    saturation: float  # answers per second, closed loop
    closed: list[Answer]
    answers: list[Answer]  # at twice the saturation rate, open loop
    elapsed: float
    rss: tuple[int, int]  # the server's, before and after the open loop

    @property
    def slowdown(self) -> float:
        """How much slower the model itself ran in the open loop than in the closed loop."""
        return batch_ms(self.answers) / batch_ms(self.closed)

    def fair(self) -> bool:
        """Both phases ran the model at about the same speed, and the load did overload."""
        return 0.67 < self.slowdown < 1.5 and any(a.status == 503 for a in self.answers)

    def report(self) -> str:
        admitted = [a for a in self.answers if a.status != 503]
        goodput = sum(in_time(a) for a in admitted) / self.elapsed
        return (
            f"saturation {self.saturation:.0f}/s; at {2 * self.saturation:.0f}/s for "
            f"{OVERLOAD_S:.0f} s: {len(self.answers)} requests sent, answered "
            f"{tally(self.answers)}, lost {sum(a.status == -1 for a in self.answers)}; goodput "
            f"{goodput:.0f}/s ({goodput / self.saturation:.0%} of saturation, "
            f"{goodput * self.slowdown / self.saturation:.0%} at the same model speed: batch "
            f"{batch_ms(self.closed):.0f} -> {batch_ms(self.answers):.0f} ms); "
            f"{sum(in_time(a) for a in admitted)}/{len(admitted)} admitted in time; "
            f"RSS {self.rss[0] / 2**20:.0f} -> {self.rss[1] / 2**20:.0f} MiB"
        )


async def trial(server: ServerProcess) -> Trial:
    closed, closed_s = await closed_loop(server.url, SATURATION_S, concurrency=12)
    saturation = sum(a.status == 200 for a in closed) / closed_s
    rss_before = rss_bytes(server.process.pid)
    answers, elapsed = await open_loop(server.url, 2 * saturation, OVERLOAD_S)
    return Trial(saturation, closed, answers, elapsed, (rss_before, rss_bytes(server.process.pid)))


@pytest.mark.slow
async def test_twice_the_saturation_rate_keeps_goodput_and_deadlines(tmp_path: Path) -> None:
    path = fault_models.save(fault_models.Work(), tmp_path / "work.pt")
    with start_server(
        "--model",
        f"work={path}:float32[2]",
        "--cpu-workers",
        "1",
        "--max-batch-size",
        "4",
        "--max-queue-size",
        "512",
        "--timeout-ms",
        str(TIMEOUT_MS),
    ) as server:
        # A second trial only when other processes changed the model's speed between the two
        # phases of the first (then "twice the saturation rate" was not what it says).
        t = await trial(server)
        print(f"\noverload: {t.report()}")
        if not t.fair():
            t = await trial(server)
            print(f"overload, second trial: {t.report()}")
    admitted = [a for a in t.answers if a.status != 503]
    goodput = sum(in_time(a) for a in admitted) / t.elapsed
    assert all(a.status != -1 for a in t.answers)  # none lost
    assert any(a.status == 503 for a in t.answers)  # it did overload
    for shed in (a for a in t.answers if a.status == 503):
        assert shed.code == "overloaded" and int(shed.headers["Retry-After"]) >= 1
    assert goodput * t.slowdown >= 0.8 * t.saturation
    assert sum(in_time(a) for a in admitted) >= 0.95 * len(admitted)
    assert t.rss[1] - t.rss[0] < 64 * 2**20
