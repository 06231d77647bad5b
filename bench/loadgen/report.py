"""The result of a load-test run as one JSON-ready dict, built from its records.

Pure (numpy only); runs in the CLI process after the run. Warm-up phases are left out of every
figure. Latency counts from each request's scheduled time; throughput counts the answers that
arrived inside the measured window, so a backlog drained after the end cannot flatter it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.loadgen.plan import OPEN, LoadPlan
from bench.loadgen.record import NO_ANSWER, RequestRecord
from bench.loadgen.schedule import phase_windows
from bench.loadgen.stats import (
    cdf_points,
    counts,
    latency_over_time,
    per_second,
    percentiles,
    schedule_lag,
)

TREND_WINDOWS = 10


@dataclass(frozen=True)
class Columns:
    """A run's records as arrays, for vectorised statistics."""

    phase: np.ndarray
    scheduled_s: np.ndarray
    dispatched_s: np.ndarray
    sent_s: np.ndarray
    done_s: np.ndarray
    status: np.ndarray
    ok: np.ndarray
    batch_size: np.ndarray
    queue_ms: np.ndarray
    compute_ms: np.ndarray
    codes: list[str]
    devices: list[str]

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> Columns:
        def col(name: str, dtype: type) -> np.ndarray:
            i = RequestRecord._fields.index(name)
            return np.fromiter((r[i] for r in records), dtype=dtype, count=len(records))

        status = col("status", np.int32)
        codes = [r.code for r in records]
        return cls(
            phase=col("phase", np.int32),
            scheduled_s=col("scheduled_s", np.float64),
            dispatched_s=col("dispatched_s", np.float64),
            sent_s=col("sent_s", np.float64),
            done_s=col("done_s", np.float64),
            status=status,
            ok=(status == 200) & np.array([not c for c in codes], dtype=bool),
            batch_size=col("batch_size", np.int64),
            queue_ms=col("queue_ms", np.float64),
            compute_ms=col("compute_ms", np.float64),
            codes=codes,
            devices=[r.device for r in records],
        )

    def select(self, mask: np.ndarray) -> Columns:
        index = np.flatnonzero(mask)
        return Columns(
            phase=self.phase[index],
            scheduled_s=self.scheduled_s[index],
            dispatched_s=self.dispatched_s[index],
            sent_s=self.sent_s[index],
            done_s=self.done_s[index],
            status=self.status[index],
            ok=self.ok[index],
            batch_size=self.batch_size[index],
            queue_ms=self.queue_ms[index],
            compute_ms=self.compute_ms[index],
            codes=[self.codes[i] for i in index],
            devices=[self.devices[i] for i in index],
        )

    @property
    def latency_ms(self) -> np.ndarray:
        latency: np.ndarray = (self.done_s - self.scheduled_s) * 1000.0
        return latency


SATURATED_CPU = 0.9  # a generator process this busy may itself be what limits the rate


def build_report(
    plan: LoadPlan,
    records: Sequence[RequestRecord],
    meta: dict[str, Any],
    cpu_fractions: Sequence[float] = (),
) -> dict[str, Any]:
    cols = Columns.of(records)
    warmup_phases = [i for i, p in enumerate(plan.phases) if p.warmup]
    measured = cols.select(~np.isin(cols.phase, warmup_phases))
    start_s, end_s = plan.warmup_s, plan.total_s
    open_loop = plan.mode == OPEN
    ok_latency = measured.latency_ms[measured.ok]
    phases = []
    for i, (phase, (lo, hi)) in enumerate(
        zip(plan.phases, phase_windows(plan.phases), strict=True)
    ):
        if not phase.warmup:
            row = _traffic(cols.select(cols.phase == i), cols, lo, hi)
            row["offered_rps"] = phase.rate_rps if open_loop else None
            phases.append(row)
    return {
        "meta": meta,
        "settings": plan.to_json(),
        "summary": _summary(measured, cols, start_s, end_s, open_loop, plan.lag_threshold_ms)
        | {
            "generator": {
                "cpu_fraction": list(cpu_fractions),
                "saturated": any(f >= SATURATED_CPU for f in cpu_fractions),
            }
        },
        "phases": phases,
        "latency_cdf": cdf_points(ok_latency),
        "latency_over_time": latency_over_time(
            measured.scheduled_s[measured.ok], ok_latency, start_s, end_s, TREND_WINDOWS
        ),
    }


def _traffic(own: Columns, every: Columns, lo: float, hi: float) -> dict[str, Any]:
    """Counts of the requests due in [lo, hi) and rates of all answers arriving in it."""
    duration = hi - lo
    arrived = (every.done_s >= lo) & (every.done_s < hi) & (every.status != NO_ANSWER)
    return {
        "duration_s": duration,
        "sent": int(own.phase.size),
        "answered": int(np.count_nonzero(own.status != NO_ANSWER)),
        "ok": int(np.count_nonzero(own.ok)),
        "sent_rps": per_second(int(own.phase.size), duration),
        "throughput_rps": per_second(int(np.count_nonzero(arrived)), duration),
        "ok_rps": per_second(int(np.count_nonzero(arrived & every.ok)), duration),
        "latency_ms": percentiles(own.latency_ms[own.ok]),
    }


def _summary(
    measured: Columns,
    every: Columns,
    start_s: float,
    end_s: float,
    open_loop: bool,
    lag_threshold_ms: float,
) -> dict[str, Any]:
    traffic = _traffic(measured, every, start_s, end_s)
    ok = measured.ok
    by_status = counts("no_answer" if s == NO_ANSWER else s for s in measured.status)
    lag = schedule_lag((measured.dispatched_s - measured.scheduled_s) * 1000.0, lag_threshold_ms)
    return {
        **traffic,
        "offered_rps": traffic["sent_rps"] if open_loop else None,
        "by_status": by_status,
        "errors_by_code": counts(c for c, good in zip(measured.codes, ok, strict=True) if not good),
        "latency_all_ms": percentiles(measured.latency_ms),
        "batch_size": counts(measured.batch_size[ok]),
        "mean_batch_size": float(measured.batch_size[ok].mean()) if ok.any() else None,
        "devices": counts(d for d, good in zip(measured.devices, ok, strict=True) if good),
        "queue_ms": percentiles(measured.queue_ms[ok]),
        "compute_ms": percentiles(measured.compute_ms[ok]),
        "schedule_lag": asdict(lag),
        # Time released requests waited for a free connection: the server's backlog, not ours.
        "connection_wait_ms": percentiles((measured.sent_s - measured.dispatched_s) * 1000.0),
    }
