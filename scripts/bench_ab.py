"""Before and after in one run: the same saturation and lone-request measurements as
`microbatch bench`, against `microbatch serve` from two checkouts, in alternating rounds (ABBA
order, so that a drift of the machine hits both alike); medians and the after/before ratio.

    python scripts/bench_ab.py --before ../baseline --after . --rounds 5 --model linear

Runs in the CLI process; each server is a subprocess started from its own checkout (its own
code on the import path), saturated by wrk (64 keep-alive connections, one fixed msgpack body)
and timed by lone requests over one keep-alive connection (client/transport.py). Needs wrk.

Besides req/s it reports the server process's CPU per request at saturation (psutil): on a
shared VM, time stolen by neighbours lowers req/s more than the CPU each request costs, so this
figure usually moves less from round to round. Ratios are also given per round (after/before of the
same round, then their median), which cancels a drift that lasts longer than one round.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import psutil

# This checkout first: run as `python scripts/bench_ab.py`, the script's own folder leads the
# path, and there scripts/bench.py would stand in for the bench package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen.fanout import run_on_loop
from bench.suite.wrk import run_wrk_blocking, wrk_path
from client.transport import Address, Transport
from client.wire import MSGPACK_HEADERS

INPUTS = {"linear": 10, "mlp": 256}
_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass
class Cell:
    label: str
    model: str
    saturation_rps: float
    errors: int
    lone_p50_ms: float
    cpu_us_per_request: float  # the server process (the event loop), at saturation; 0: unknown


def body_for(model: str) -> bytes:
    x = np.random.default_rng(0).standard_normal(INPUTS[model]).astype(np.float32)
    tensor = {"dtype": "float32", "shape": list(x.shape), "data": x.tobytes()}
    return msgpack.packb({"inputs": {"x": tensor}})  # type: ignore[no-any-return]


def start(checkout: Path, model: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROBATCH_")}
    env["PYTHONPATH"] = str(checkout)
    env["MICROBATCH_DEVICES_CALIBRATION_CACHE"] = ""
    log = Path(tempfile.mkstemp(prefix="bench-ab-", suffix=".log")[1])
    argv = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--model", model]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=checkout, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        match = _LISTENING.search(text)
        if match and "ready: serving" in text:
            return process, match.group(1), log
        if process.poll() is not None:
            raise SystemExit(f"server from {checkout} exited:\n{text[-2000:]}")
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"server from {checkout} not ready in 120 s")


def lone_p50_ms(url: str, model: str, body: bytes, count: int) -> float:
    """Median round trip of `count` requests one after another over one keep-alive connection,
    sent by the client's transport (the HTTP client of the generator and of client/)."""

    async def times_ms() -> list[float]:
        transport, address = Transport(1), Address.parse(url)
        times = []
        try:
            for _ in range(count):
                started = time.perf_counter()
                reply = await transport.request(
                    address,
                    "POST",
                    f"/v1/models/{model}/infer",
                    body=body,
                    headers=MSGPACK_HEADERS,
                    timeout_s=10.0,
                )
                times.append((time.perf_counter() - started) * 1000.0)
                if reply.status != 200:
                    raise SystemExit(f"lone request answered {reply.status}")
        finally:
            await transport.close()
        return times

    return statistics.median(run_on_loop(times_ms))


def measure(label: str, checkout: Path, model: str, seconds: float) -> Cell:
    wrk = wrk_path()
    assert wrk is not None
    process, url, log = start(checkout, model)
    try:
        body = body_for(model)
        infer = f"{url}/v1/models/{model}/infer"
        run_wrk_blocking(wrk, infer, body, 64, 2.0)  # warm-up
        cpu_before = cpu_seconds(process.pid)
        report = run_wrk_blocking(wrk, infer, body, 64, seconds)
        cpu_after = cpu_seconds(process.pid)
        errors = report.non_2xx + report.socket_errors
        lone = lone_p50_ms(url, model, body, 400)
    finally:
        process.terminate()
        process.wait(30)
        log.unlink(missing_ok=True)
    answered = max(0, report.requests - errors)
    rps = answered / report.duration_s
    cpu_us = 0.0
    if cpu_before is not None and cpu_after is not None and answered:
        cpu_us = (cpu_after - cpu_before) / answered * 1e6
    return Cell(label, model, rps, errors, lone, cpu_us)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far; None if it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, type=Path, help="checkout measured as before")
    parser.add_argument("--after", required=True, type=Path, help="checkout measured as after")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="saturation run per cell")
    parser.add_argument("--model", action="append", choices=sorted(INPUTS), default=[])
    args = parser.parse_args()
    if wrk_path() is None:
        raise SystemExit("bench_ab needs wrk")
    cells: list[Cell] = []
    for model in args.model or ["linear", "mlp"]:
        for r in range(args.rounds):
            order = [("before", args.before), ("after", args.after)]
            for label, checkout in order if r % 2 == 0 else order[::-1]:
                cell = measure(label, checkout.resolve(), model, args.seconds)
                cells.append(cell)
                print(
                    f"round {r + 1} {model:6} {label:6} {cell.saturation_rps:9.0f} req/s "
                    f"(errors {cell.errors})  lone p50 {cell.lone_p50_ms:.3f} ms  "
                    f"server CPU {cell.cpu_us_per_request:.1f} us/request",
                    flush=True,
                )
        report(model, [c for c in cells if c.model == model])
    return 0


def report(model: str, cells: list[Cell]) -> None:
    def med(label: str, pick: str) -> float:
        return float(statistics.median(getattr(c, pick) for c in cells if c.label == label))

    def paired(pick: str) -> float:
        """The median over rounds of after/before within the same round."""
        b = [getattr(c, pick) for c in cells if c.label == "before"]
        a = [getattr(c, pick) for c in cells if c.label == "after"]
        return float(statistics.median(y / x for x, y in zip(b, a, strict=True) if x))

    before, after = med("before", "saturation_rps"), med("after", "saturation_rps")
    lone_b, lone_a = med("before", "lone_p50_ms"), med("after", "lone_p50_ms")
    cpu_b, cpu_a = med("before", "cpu_us_per_request"), med("after", "cpu_us_per_request")
    rounds = sum(c.label == "before" for c in cells)
    print(
        f"{model}: median of {rounds} rounds: saturation {before:.0f} -> {after:.0f} req/s "
        f"(after/before {after / before:.3f}, per round {paired('saturation_rps'):.3f}); "
        f"lone p50 {lone_b:.3f} -> {lone_a:.3f} ms ({lone_a / lone_b:.3f})",
        flush=True,
    )
    if cpu_b and cpu_a:
        print(
            f"{model}: server CPU per request at saturation {cpu_b:.1f} -> {cpu_a:.1f} us "
            f"(after/before {cpu_a / cpu_b:.3f}, per round {paired('cpu_us_per_request'):.3f})",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
