"""Variable-length batching on the built-in encoder, as ratios measured in one run.

Under a long-tailed mix of lengths (default pareto:8:512), at saturation (closed loop), three
servers in turn, in alternating order over the rounds:
  length-aware   batches of similar lengths (the default, batching.length_aware = true)
  pad-longest    the oldest requests as they came, padded to the longest (length_aware = false)
  batch-1        max_batch_size = 1: no padding, no batching
and reports each one's throughput (median over the rounds), the ratios, and the padding waste
(positions computed vs requested, from /metrics). Beside them, the model's own ceiling, without
a server: the same lengths run one at a time against the best batching anyone could do (sorted,
full batches of one length band), timed in this process on one thread as a worker runs them.

Then, on the length-aware server, the p50 latency at 200 requests/s against a lone request's
over the same lengths. A lone request is one that finds the server idle: sent open-loop at a low
rate (--lone-rate), so it pays the same generator timing and idle wake-ups as the loaded run;
back to back (one client, no pause) is printed too, though it keeps every core warm.

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
sys.path.insert(0, str(ROOT))  # the bench package, not scripts/bench.py beside this file
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
    parser.add_argument(
        "--lone-rate", type=float, default=20.0, help="open-loop rate at which requests come alone"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="as the servers run")
    args = parser.parse_args()
    ceiling = [model_ceiling(args.lengths, args.max_batch_size, seed) for seed in range(3)]
    alone_s = statistics.median(c[0] for c in ceiling)
    batched_s = statistics.median(c[1] for c in ceiling)
    print(
        f"model alone, {args.lengths}: {1000 * alone_s:.3f} ms a request one at a time, "
        f"{1000 * batched_s:.3f} ms in ideal batches: batching can gain at most "
        f"{alone_s / batched_s:.2f}x on this CPU",
        flush=True,
    )
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
        f"(aim >= 4x; the model's own ceiling {alone_s / batched_s:.2f}x)"
    )
    runs: dict[str, list[dict[str, Any]]] = {"back to back": [], "lone": [], "paced": []}
    with Server({}) as server:
        for _ in range(args.rounds):
            runs["back to back"].append(loadtest(server.url, args, "--concurrency", "1"))
            runs["lone"].append(loadtest(server.url, args, "--rate", str(args.lone_rate)))
            runs["paced"].append(loadtest(server.url, args, "--rate", str(args.rate)))
    p50 = {name: latency_p50(reports) for name, reports in runs.items()}
    labels = {
        "back to back": "back to back (1 client)",
        "lone": f"lone (open loop, {args.lone_rate:g} req/s)",
        "paced": f"at {args.rate:g} req/s",
    }
    print("  p50 latency (ms): total = generator lag + server queue + compute + the rest")
    for name, (total, lag, queue, compute) in p50.items():
        print(
            f"    {labels[name]:28s} {total:6.2f} = {lag:4.2f} lag + {queue:5.3f} queue "
            f"+ {compute:5.3f} compute + {total - lag - queue - compute:4.2f}"
        )
    difference = p50["paced"][0] - p50["lone"][0]
    print(f"  p50 at {args.rate:g} req/s vs lone: {difference:+.2f} ms (aim within 0.5 ms)")
    return 0


def latency_p50(reports: list[dict[str, Any]]) -> tuple[float, float, float, float]:
    """Medians over the rounds of the p50s: latency, generator lag, server queue, compute."""

    def median(pick: Any) -> float:
        return float(statistics.median(pick(r["summary"]) for r in reports))

    return (
        median(lambda s: s["latency_ms"]["p50"]),
        median(lambda s: s["schedule_lag"]["p50_ms"]),
        median(lambda s: s["queue_ms"]["p50"]),
        median(lambda s: s["compute_ms"]["p50"]),
    )


def model_ceiling(lengths: str, max_batch_size: int, seed: int) -> tuple[float, float]:
    """Seconds a request costs the bare encoder on one thread: one at a time, and in the best
    batches there can be (requests of one length together, up to max_batch_size, no padding).
    Their ratio bounds what any batching server gains on this CPU."""
    import numpy as np
    import torch

    from bench.loadgen.lengths import draw_lengths, parse_lengths
    from server.models.encoder import VOCAB, build_encoder

    torch.set_num_threads(1)
    model = build_encoder()
    drawn = np.sort(draw_lengths(parse_lengths(lengths), 600, np.random.default_rng(seed)))
    rng = torch.Generator().manual_seed(seed)

    def run(n: int, length: int) -> float:
        ids = torch.randint(0, VOCAB, (n, length), generator=rng)
        mask = torch.zeros(n, length, dtype=torch.bool)
        start = time.perf_counter()
        model(ids, mask)
        return time.perf_counter() - start

    with torch.inference_mode():
        for length in (8, 64, 512):  # warm-up: allocator, kernels
            run(1, length)
            run(max_batch_size, length)
        alone = sum(run(1, int(length)) for length in drawn)
        values, counts = np.unique(drawn, return_counts=True)
        batched = 0.0
        for length, count in zip(values.tolist(), counts.tolist(), strict=True):
            for start in range(0, count, max_batch_size):
                batched += run(min(max_batch_size, count - start), length)
    return alone / len(drawn), batched / len(drawn)


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
