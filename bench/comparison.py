"""What `microbatch compare` concludes from its measurements: the winner per batch size, the
crossover batch size and a one-line recommendation; and the table and JSON that show them.

Pure: plain numbers in, plain data and text out (the table rendered by rich into a string);
no torch, no I/O.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

CPU = "cpu"
TABLE_WIDTH = 1000  # as wide as the columns need: the lines never wrap


@dataclass(frozen=True)
class Measurement:
    """One device at one batch size: median and quartiles of the batch latency."""

    device: str
    samples: int
    median_s: float
    p25_s: float
    p75_s: float
    runs: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.median_s if self.median_s > 0 else 0.0


@dataclass(frozen=True)
class Row:
    samples: int
    by_device: dict[str, Measurement]
    winner: str


@dataclass(frozen=True)
class Summary:
    devices: list[str]
    rows: list[Row]
    # The smallest measured size from which a GPU (the fastest at each size) beats the CPU at
    # every larger one; and the same for each GPU on its own.
    crossover: int | None
    recommendation: str
    crossovers: dict[str, int | None] = field(default_factory=dict)


def summarize(measurements: Sequence[Measurement]) -> Summary:
    devices = list(dict.fromkeys(m.device for m in measurements))
    sizes = sorted({m.samples for m in measurements})
    rows = []
    for n in sizes:
        by_device = {m.device: m for m in measurements if m.samples == n}
        winner = min(by_device.values(), key=lambda m: (m.median_s, m.device != CPU)).device
        rows.append(Row(n, by_device, winner))
    gpus = [d for d in devices if d != CPU]
    if not gpus or CPU not in devices:
        return Summary(devices, rows, None, _recommend(rows, gpus, None))
    crossovers = {gpu: _crossover(rows, [gpu]) for gpu in gpus}
    cross = _crossover(rows, gpus)
    return Summary(devices, rows, cross, _recommend(rows, gpus, cross), crossovers)


def _crossover(rows: Sequence[Row], gpus: Sequence[str]) -> int | None:
    """From the largest size down, while the fastest of `gpus` there beats the CPU."""
    found = None
    for row in reversed(rows):
        times = [row.by_device[g].median_s for g in gpus if g in row.by_device]
        if CPU not in row.by_device or not times:
            continue
        if min(times) >= row.by_device[CPU].median_s:
            break
        found = row.samples
    return found


def _recommend(rows: Sequence[Row], gpus: Sequence[str], cross: int | None) -> str:
    if not rows:
        return "nothing was measured."
    if not gpus:
        return (
            'no CUDA GPU found: every batch runs on the CPU pool; routing = "auto" needs no change.'
        )
    smallest, largest = rows[0].samples, rows[-1].samples
    # The GPU named is the one that wins the largest batches: where a GPU matters most.
    gpu = rows[-1].winner if rows[-1].winner != CPU else gpus[0]
    if cross is None:
        return (
            f"the CPU wins at every measured batch size up to {largest}: "
            'routing = "cpu" suits this model (or keep "auto", which measures the same).'
        )
    if cross <= smallest:
        return f'{gpu} wins at every measured batch size: routing = "cuda" or "auto" suits it.'
    return (
        f"batches of {cross} samples or more finish sooner on {gpu}, smaller ones on the CPU: "
        'keep routing = "auto", which sends each batch where it finishes first.'
    )


def format_table(summary: Summary, length: int | None = None) -> list[str]:
    """Per batch size: latency (median, and the p25-p75 spread) and throughput per device, as
    the lines of a terminal table (rich's, rendered to text here); `length`: the padded length
    every batch was timed at (a model with a dynamic dimension), named in the first column."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("batch" if length is None else f"batch x {length}", justify="right")
    for device in summary.devices:
        table.add_column(f"{device} ms", justify="right")
        table.add_column("p25-p75", justify="right")
        table.add_column("samples/s", justify="right")
    table.add_column("winner")
    for row in summary.rows:
        cells = [str(row.samples)]
        for device in summary.devices:
            m = row.by_device.get(device)
            if m is None:
                cells += ["-", "", ""]
            else:
                spread = f"{m.p25_s * 1e3:.3f}-{m.p75_s * 1e3:.3f}"
                cells += [f"{m.median_s * 1e3:.3f}", spread, f"{m.samples_per_s:.0f}"]
        table.add_row(*cells, row.winner)
    text = io.StringIO()
    Console(file=text, width=TABLE_WIDTH, color_system=None, highlight=False).print(table)
    return [line.rstrip() for line in text.getvalue().splitlines()]


def to_json(summary: Summary, context: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for row in summary.rows:
        entry: dict[str, Any] = {"batch_size": row.samples, "winner": row.winner}
        for device, m in row.by_device.items():
            entry[device] = {
                "median_ms": m.median_s * 1e3,
                "p25_ms": m.p25_s * 1e3,
                "p75_ms": m.p75_s * 1e3,
                "runs": m.runs,
                "samples_per_s": m.samples_per_s,
            }
        rows.append(entry)
    return {
        **context,
        "devices": summary.devices,
        "rows": rows,
        "crossover_batch_size": summary.crossover,
        "crossover_batch_size_by_device": summary.crossovers,
        "recommendation": summary.recommendation,
    }


def parse_sizes(text: str) -> list[int]:
    """`1,2,4,...,1024` (a geometric run: the ratio of the two sizes before `...`) or a list."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    sizes: list[int] = []
    for i, part in enumerate(parts):
        if part != "...":
            sizes.append(int(part))
            continue
        if len(sizes) < 2 or i + 1 >= len(parts) or sizes[-1] <= sizes[-2]:
            raise ValueError("write `...` after two rising sizes and before the last one")
        ratio = sizes[-1] / sizes[-2]
        end = int(parts[i + 1])
        while round(sizes[-1] * ratio) < end:
            sizes.append(round(sizes[-1] * ratio))
    if not sizes or min(sizes) < 1:
        raise ValueError("batch sizes must be integers >= 1")
    return sorted(set(sizes))
