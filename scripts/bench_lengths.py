"""Variable-length batching on the built-in encoder, as ratios measured in one run.

Under a long-tailed mix of lengths (default pareto:8:512), at saturation (closed loop), three
servers in turn, in alternating order over the rounds:
  length-aware   batches of similar lengths (the default, batching.length_aware = true)
  pad-longest    the oldest requests as they came, padded to the longest (length_aware = false)
  batch-1        max_batch_size = 1: no padding, no batching
and reports each one's throughput (median over the rounds), the ratios, and the padding waste
(positions computed vs requested, from /metrics). Then, on the length-aware server, the p50
latency at 200 requests/s against a lone request's (one at a time) over the same lengths.

Traffic goes to 127.0.0.1 only. Run it on a quiet machine:
    python scripts/bench_lengths.py --rounds 3 --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS: dict[str, dict[str, str]] = {
    "length-aware": {},
    "pad-longest": {"MICROBATCH_BATCHING_LENGTH_AWARE": "false"},
    "batch-1": {"MICROBATCH_BATCHING_MAX_BATCH_SIZE": "1"},
}
_TOKENS = re.compile(r'microbatch_tokens_total\{kind="(\w+)",model="encoder"\} ([0-9.e+]+)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--lengths", default="pareto:8:512")
    parser.add_argument("--concurrency", type=int, default=64, help="clients at saturation")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop rate for latency")
    args = parser.parse_args()
    throughput: dict[str, list[float]] = {name: [] for name in CONFIGS}
    waste: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        order = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            with Server(CONFIGS[name]) as server:
                before = server.tokens()
                report = loadtest(server.url, args, "--concurrency", str(args.concurrency))
                after = server.tokens()
            throughput[name].append(report["summary"]["ok_rps"])
            requested = after["requested"] - before["requested"]
            computed = after["computed"] - before["computed"]
            waste[name].append(1.0 - requested / computed if computed else 0.0)
            print(
                f"round {round_ + 1} {name:13s} {throughput[name][-1]:8.1f} req/s  "
                f"padding {100 * waste[name][-1]:5.1f}% of positions computed",
                flush=True,
            )
    median = {name: statistics.median(values) for name, values in throughput.items()}
    print(
        f"\nencoder, lengths {args.lengths}, {args.concurrency} clients, "
        f"median of {args.rounds} rounds (req/s):"
    )
    for name in CONFIGS:
        share = 100 * statistics.median(waste[name])
        print(f"  {name:13s} {median[name]:8.1f}   padding {share:5.1f}%")
    print(
        f"  length-aware / pad-longest: {median['length-aware'] / median['pad-longest']:.2f}x "
        "(aim >= 1.5x)"
    )
    print(
        f"  length-aware / batch-1:     {median['length-aware'] / median['batch-1']:.2f}x "
        "(aim >= 4x)"
    )
    with Server({}) as server:
        lone = [loadtest(server.url, args, "--concurrency", "1") for _ in range(args.rounds)]
        paced = [loadtest(server.url, args, "--rate", str(args.rate)) for _ in range(args.rounds)]
    lone_p50 = statistics.median(r["summary"]["latency_ms"]["p50"] for r in lone)
    paced_p50 = statistics.median(r["summary"]["latency_ms"]["p50"] for r in paced)
    print(
        f"  p50 at {args.rate:g} req/s: {paced_p50:.2f} ms; a lone request's: {lone_p50:.2f} ms; "
        f"difference {paced_p50 - lone_p50:+.2f} ms (aim within 0.5 ms)"
    )
    return 0


def loadtest(url: str, args: argparse.Namespace, *mode: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "loadtest",
                "--url",
                url,
                "--model",
                "encoder",
                *mode,
                "--duration",
                str(args.duration),
                "--warmup",
                "2",
                "--lengths",
                args.lengths,
                "--no-progress",
                "--json",
                str(out),
            ],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        report: dict[str, Any] = json.loads(out.read_text())
    errors = report["summary"]["errors_by_code"]
    if errors:
        print(f"  errors: {errors}", file=sys.stderr)
    return report


class Server:
    """`microbatch serve --model encoder` on a free loopback port, with extra variables."""

    def __init__(self, env: dict[str, str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--model",
                "encoder",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 180.0
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self._log.seek(0)
        raise SystemExit(f"server did not become ready:\n{self._log.read().decode()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.wait(60)
        self._log.close()

    def tokens(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        found = {kind: float(value) for kind, value in _TOKENS.findall(text)}
        return {"requested": found.get("requested", 0.0), "computed": found.get("computed", 0.0)}


if __name__ == "__main__":
    sys.exit(main())
