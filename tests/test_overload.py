"""No congestion collapse: at twice the saturation rate (open loop), the server keeps answering
admitted requests at (nearly) the saturation throughput within their deadline, sheds the rest
early with 503 overloaded + Retry-After, and its memory stays bounded.

A real server process with one CPU worker and a model whose batch costs a fixed time; the
saturation rate is measured in the same run (closed loop), then the open-loop load runs at
twice that for a few seconds. All of it goes to 127.0.0.1, bounded in count and time. Deadlines
are checked as the client sees them: every admitted request answered 200 within its timeout,
sending and reading included, not by the server's own account of its queue and compute time.

On a shared machine the model itself may run slower in one phase than the other (other
processes take the cores); goodput is compared after scaling by the model's own batch time in
each phase (compute_ms, as the worker measured it), which congestion collapse cannot change:
collapse shows as capacity spent on late or shed work, not as a slower model. The scaling is
capped, so that a slow phase can lower the bar to no less than 70% of saturation; a trial
whose phases differ too much is run again (at most MAX_TRIALS in all), and the last must be
fair. Memory is checked at its peak (VmHWM), not only before and after.
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
from tests.probes import Answer, peak_rss_bytes, rss_bytes, send, tally, work
from tests.server_process import ServerProcess, start_server

ROUNDS = 40  # tests/fault_models.Work: one fixed time per batch, whatever its size (25-90 ms)
TIMEOUT_MS = 1000.0
SATURATION_S = 3.0
OVERLOAD_S = 4.0
GOODPUT = 0.8  # of the saturation throughput, at the same model speed
FLOOR = 0.7  # ... and never less than this, however much slower the model ran
MAX_SCALING = GOODPUT / FLOOR
FAIR = (0.67, 1.3)  # slowdowns within which a trial compares like with like
MAX_TRIALS = 3
MAX_GROWTH_BYTES = 64 * 2**20


def in_time(answer: Answer) -> bool:
    """Answered, and within the request's deadline as the client measured it."""
    return answer.status == 200 and answer.latency_s * 1e3 <= TIMEOUT_MS


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
            # i % 600: never fault_models.POISON (666), which would make the model raise.
            value = float(i % 600)
            tasks.append(asyncio.create_task(send(session, url, "work", work(value, ROUNDS))))
        answers = await asyncio.gather(*tasks)
        return list(answers), time.monotonic() - started


@dataclass
class Trial:
    saturation: float  # answers per second, closed loop
    closed: list[Answer]
    answers: list[Answer]  # at twice the saturation rate, open loop
    elapsed: float
    rss: tuple[int, int, int]  # the server's: before the open loop, its peak, after it

    @property
    def slowdown(self) -> float:
        """How much slower the model itself ran in the open loop than in the closed loop."""
        return batch_ms(self.answers) / batch_ms(self.closed)

    @property
    def scaling(self) -> float:
        """The slowdown, capped: however slow the open loop ran, the bar stays >= FLOOR."""
        return min(self.slowdown, MAX_SCALING)

    @property
    def admitted(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 503]

    @property
    def goodput(self) -> float:
        """Answers per second that came back 200 within their deadline."""
        return sum(in_time(a) for a in self.admitted) / self.elapsed

    def fair(self) -> bool:
        """Both phases ran the model at about the same speed, and the load did overload."""
        return FAIR[0] < self.slowdown < FAIR[1] and any(a.status == 503 for a in self.answers)

    def report(self) -> str:
        admitted = self.admitted
        latencies = sorted(a.latency_s * 1e3 for a in admitted)
        slowest = latencies[-1] if latencies else 0.0
        return (
            f"saturation {self.saturation:.0f}/s; at {2 * self.saturation:.0f}/s for "
            f"{OVERLOAD_S:.0f} s: {len(self.answers)} requests sent, answered "
            f"{tally(self.answers)}, lost {sum(a.status == -1 for a in self.answers)}; goodput "
            f"{self.goodput:.0f}/s ({self.goodput / self.saturation:.0%} of saturation, "
            f"{self.goodput * self.scaling / self.saturation:.0%} at the same model speed: "
            f"batch {batch_ms(self.closed):.0f} -> {batch_ms(self.answers):.0f} ms); "
            f"{sum(in_time(a) for a in admitted)}/{len(admitted)} admitted in time (slowest "
            f"{slowest:.0f} ms at the client); RSS {self.rss[0] / 2**20:.0f} MiB, peak "
            f"{self.rss[1] / 2**20:.0f}, after {self.rss[2] / 2**20:.0f}"
        )


async def trial(server: ServerProcess) -> Trial:
    closed, closed_s = await closed_loop(server.url, SATURATION_S, concurrency=12)
    saturation = sum(a.status == 200 for a in closed) / closed_s
    pid = server.process.pid
    rss_before = rss_bytes(pid)
    answers, elapsed = await open_loop(server.url, 2 * saturation, OVERLOAD_S)
    return Trial(
        saturation, closed, answers, elapsed, (rss_before, peak_rss_bytes(pid), rss_bytes(pid))
    )


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
        # Another trial only when other processes changed the model's speed between the two
        # phases of one (then "twice the saturation rate" was not what it says).
        t = await trial(server)
        print(f"\noverload: {t.report()}")
        for attempt in range(2, MAX_TRIALS + 1):
            if t.fair():
                break
            t = await trial(server)
            print(f"overload, trial {attempt}: {t.report()}")
    assert t.fair(), f"no fair trial in {MAX_TRIALS}: {t.report()}"
    assert all(a.status != -1 for a in t.answers)  # none lost
    assert any(a.status == 503 for a in t.answers)  # it did overload
    for shed in (a for a in t.answers if a.status == 503):
        assert shed.code == "overloaded" and int(shed.headers["Retry-After"]) >= 1
    # Every admitted request answered, and in time as its client counts it.
    late = [(a.status, a.code, round(a.latency_s * 1e3)) for a in t.admitted if not in_time(a)]
    assert not late, late
    assert t.goodput * t.scaling >= GOODPUT * t.saturation
    # The peak (VmHWM covers the whole run, so it bounds everything in between) as well as
    # the end: memory that rose under overload and fell back would pass a before/after check.
    assert t.rss[1] - t.rss[0] < MAX_GROWTH_BYTES
    assert t.rss[2] - t.rss[0] < MAX_GROWTH_BYTES
