"""Statistics over a run's numbers: percentiles, CDF points, counts, lag behind the schedule and
latency over time.

Pure functions of numpy arrays (no clock, no I/O); run in the CLI process after the run. An
empty input gives None where a number would be, so that reports stay valid JSON.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50),
    ("p90", 90),
    ("p99", 99),
    ("p99.9", 99.9),
)


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/p99.9 (linear interpolation between ranks), max and mean of finite values."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        empty: dict[str, float | None] = {name: None for name, _ in PERCENTILES}
        return empty | {"max": None, "mean": None}
    points = np.percentile(finite, [q for _, q in PERCENTILES])
    result: dict[str, float | None] = {
        name: float(v) for (name, _), v in zip(PERCENTILES, points, strict=True)
    }
    result["max"] = float(finite.max())
    result["mean"] = float(finite.mean())
    return result


def cdf_points(values: np.ndarray, max_points: int = 200) -> list[tuple[float, float]]:
    """(value, fraction <= value) at up to max_points evenly spaced ranks, the max included."""
    finite = np.sort(values[np.isfinite(values)])
    n = finite.size
    if n == 0:
        return []
    ranks = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(np.int64))
    return [(float(finite[r]), float((r + 1) / n)) for r in ranks]


def counts(values: Iterable[object]) -> dict[str, int]:
    """How often each value occurs, keyed by its text, in natural order (numbers numerically)."""
    tally = Counter(str(v) for v in values)
    return dict(sorted(tally.items(), key=lambda kv: _natural(kv[0])))


def _natural(key: str) -> tuple[int, float, str]:
    try:
        return (0, float(key), "")
    except ValueError:
        return (1, 0.0, key)


@dataclass(frozen=True)
class Lag:
    """How late requests left the generator against their schedule."""

    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    late_fraction: float  # sent more than threshold_ms after they were due
    threshold_ms: float
    fell_behind: bool


def schedule_lag(
    lags_ms: np.ndarray, threshold_ms: float = 10.0, tolerated_fraction: float = 0.01
) -> Lag:
    """The generator fell behind when more than tolerated_fraction left threshold_ms late.

    A late send still counts its latency from the schedule, so the figures stay honest; the flag
    says the generator, not only the server, may have shaped them.
    """
    if lags_ms.size == 0:
        return Lag(None, None, None, 0.0, threshold_ms, False)
    late = float(np.count_nonzero(lags_ms > threshold_ms) / lags_ms.size)
    p50, p99 = np.percentile(lags_ms, [50, 99])
    return Lag(
        float(p50),
        float(p99),
        float(lags_ms.max()),
        late,
        threshold_ms,
        late > tolerated_fraction,
    )


def latency_over_time(
    scheduled_s: np.ndarray, latency_ms: np.ndarray, start_s: float, end_s: float, windows: int
) -> list[dict[str, float | int | None]]:
    """Latency of the requests due in each of `windows` equal slices of [start_s, end_s)."""
    edges = np.linspace(start_s, end_s, windows + 1)
    rows: list[dict[str, float | int | None]] = []
    for lo, hi in itertools.pairwise(edges):
        inside = latency_ms[(scheduled_s >= lo) & (scheduled_s < hi)]
        pct = percentiles(inside)
        rows.append(
            {
                "start_s": float(lo),
                "end_s": float(hi),
                "requests": int(inside.size),
                "p50_ms": pct["p50"],
                "p99_ms": pct["p99"],
            }
        )
    return rows


def per_second(count: int, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0
