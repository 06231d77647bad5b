"""The pure statistics and the report, tested with numbers: percentiles, counts, lag, trends,
and a report built from hand-made records."""

from __future__ import annotations

import io
import json
import math

import msgpack
import numpy as np
import pytest

from bench.loadgen.markdown import report_markdown
from bench.loadgen.plan import OPEN, LoadPlan
from bench.loadgen.progress import ProgressBar, enabled_for
from bench.loadgen.record import NO_ANSWER, RequestRecord, failed, from_answer
from bench.loadgen.report import build_report
from bench.loadgen.schedule import Phase
from bench.loadgen.stats import cdf_points, counts, latency_over_time, percentiles, schedule_lag


def test_percentiles_of_known_numbers() -> None:
    values = np.arange(1, 1001, dtype=np.float64)
    pct = percentiles(np.concatenate([values, [np.nan]]))  # NaN (no answer) is left out
    assert pct["p50"] == pytest.approx(500.5)
    assert pct["p90"] == pytest.approx(900.1)
    assert pct["p99"] == pytest.approx(990.01)
    assert pct["p99.9"] == pytest.approx(999.001)
    assert pct["max"] == 1000 and pct["mean"] == pytest.approx(500.5)
    assert set(percentiles(np.array([]))).issuperset({"p50", "max"})
    assert all(v is None for v in percentiles(np.array([np.nan])).values())


def test_cdf_is_monotone_and_ends_at_the_max() -> None:
    points = cdf_points(np.random.default_rng(0).exponential(10.0, 5000), max_points=50)
    assert len(points) == 50
    xs, ys = zip(*points, strict=True)
    assert list(xs) == sorted(xs) and list(ys) == sorted(ys)
    assert ys[-1] == 1.0 and ys[0] == pytest.approx(1 / 5000)
    assert cdf_points(np.array([3.0])) == [(3.0, 1.0)]


def test_counts_sort_numbers_as_numbers() -> None:
    assert list(counts([10, 2, 1, 2, "cpu"])) == ["1", "2", "10", "cpu"]
    assert counts([10, 2, 1, 2])["2"] == 2


def test_the_generator_is_behind_when_more_than_one_percent_leaves_late() -> None:
    on_time = np.zeros(995)
    assert not schedule_lag(np.concatenate([on_time, np.full(5, 50.0)])).fell_behind
    lag = schedule_lag(np.concatenate([on_time, np.full(20, 50.0)]))
    assert lag.fell_behind and lag.late_fraction == pytest.approx(20 / 1015)
    assert lag.max_ms == 50.0
    assert not schedule_lag(np.array([])).fell_behind


def test_latency_over_time_shows_a_growing_backlog() -> None:
    scheduled = np.linspace(0, 10, 1000, endpoint=False)
    latency = 20 + 100 * scheduled  # a queue growing by 100 ms per second
    rows = latency_over_time(scheduled, latency, 0.0, 10.0, 5)
    p50s = [row["p50_ms"] for row in rows]
    assert p50s == sorted(p50s) and [row["requests"] for row in rows] == [200] * 5
    assert p50s[0] == pytest.approx(119.5, abs=1) and p50s[-1] == pytest.approx(919.5, abs=1)


def test_answers_are_parsed_into_records() -> None:
    ok = msgpack.packb(
        {"outputs": {}, "batch_size": 7, "device": "cpu", "queue_ms": 1.5, "compute_ms": 2}
    )
    r = from_answer(0, 1.0, 1.0, 1.001, 1.021, 200, ok)
    assert r.ok and (r.batch_size, r.device, r.queue_ms, r.compute_ms) == (7, "cpu", 1.5, 2.0)
    assert r.latency_ms == pytest.approx(21.0)
    error = msgpack.packb({"error": {"code": "overloaded", "message": "full"}})
    assert from_answer(0, 0, 0, 0, 0.1, 503, error).code == "overloaded"
    assert from_answer(0, 0, 0, 0, 0.1, 502, b"<html>").code == "http_502"
    assert from_answer(0, 0, 0, 0, 0.1, 200, b"\xc1").code == "bad_answer"
    assert not failed(0, 0, 0, 0, math.nan, "unfinished").ok


def _record(
    phase: int, at: float, latency_ms: float, status: int = 200, code: str = "", batch: int = 1
) -> RequestRecord:
    done = at + latency_ms / 1000.0 if status != NO_ANSWER else math.nan
    ok = status == 200 and not code
    queue_ms, compute_ms = (0.5, 1.0) if ok else (math.nan, math.nan)
    device = "cpu" if ok else ""
    return RequestRecord(
        phase, at, at, at, done, status, code, batch if ok else 0, device, queue_ms, compute_ms
    )


def _plan() -> LoadPlan:
    phases = (Phase(10, 1.0, warmup=True), Phase(10, 2.0), Phase(20, 2.0))
    return LoadPlan("http://127.0.0.1:1", "m", OPEN, phases)


def _records() -> list[RequestRecord]:
    warmup = [_record(0, k * 0.1, 5.0) for k in range(10)]
    first = [_record(1, 1 + k * 0.1, 10.0, batch=2) for k in range(20)]
    second = [_record(2, 3 + k * 0.05, 30.0) for k in range(33)]
    second += [_record(2, 4.65 + k * 0.05, 1.0, 503, "overloaded") for k in range(4)]
    second += [_record(2, 4.85, math.nan, NO_ANSWER, "client_timeout")]
    second += [_record(2, 4.9, 30.0), _record(2, 4.95, 100.0)]  # the last lands after the end
    return warmup + first + second


def test_the_report_counts_what_happened_and_leaves_out_the_warmup() -> None:
    report = build_report(_plan(), _records(), {"tool": "test"})
    s = report["summary"]
    assert (s["sent"], s["answered"], s["ok"]) == (60, 59, 55)
    assert s["by_status"] == {"200": 55, "503": 4, "no_answer": 1}
    assert s["errors_by_code"] == {"client_timeout": 1, "overloaded": 4}
    assert s["offered_rps"] == 15.0  # 60 requests due in the 4 measured seconds
    assert s["throughput_rps"] == 58 / 4  # the answer after the end is not counted
    assert s["ok_rps"] == 54 / 4
    assert s["latency_ms"]["p50"] == pytest.approx(30.0)
    assert s["latency_ms"]["max"] == pytest.approx(100.0)
    assert s["batch_size"] == {"1": 35, "2": 20} and s["devices"] == {"cpu": 55}
    assert s["mean_batch_size"] == pytest.approx((35 + 40) / 55)
    assert s["compute_ms"]["p50"] == 1.0 and not s["schedule_lag"]["fell_behind"]
    first, second = report["phases"]
    assert (first["offered_rps"], first["sent"]) == (10, 20)
    assert first["latency_ms"]["p50"] == pytest.approx(10.0)
    assert (second["offered_rps"], second["sent"], second["ok"]) == (20, 40, 35)
    trend = report["latency_over_time"]
    assert trend[0]["p50_ms"] == pytest.approx(10.0)
    assert trend[-1]["p50_ms"] == pytest.approx(30.0)
    json.dumps(report, allow_nan=False)  # NaN from failed requests never reaches the JSON


def test_the_markdown_summary_holds_the_tables_and_warns_when_behind() -> None:
    report = build_report(_plan(), _records(), {})
    text = report_markdown(report)
    assert "| whole run | 60 | 59 | 55 | 15.0 | 14.5 | 13.5 |" in text
    assert "overloaded: 4" in text and "Warning" not in text
    late = [r._replace(dispatched_s=r.scheduled_s + 0.05) for r in _records()]
    assert "fell behind its schedule" in report_markdown(build_report(_plan(), late, {}))
    busy = report_markdown(build_report(_plan(), _records(), {}, cpu_fractions=[0.5, 0.95]))
    assert "kept its core 95% busy" in busy and "fell behind" not in busy


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_draws_each_update_on_a_terminal() -> None:
    stream = Terminal()
    bar = ProgressBar(stream, enabled_for(stream, False), 10.0)
    bar.update(5.0, 1500, 3)
    drawn = stream.getvalue()  # at once, with no refresh thread to wait for
    assert "5.0/10.0 s" in drawn and "1,500 done" in drawn and "300 req/s" in drawn
    assert "3 failed" in drawn
    bar.update(20.0, 3000, 3)  # past the end: the bar stops full
    bar.close()
    last = stream.getvalue().rpartition("\r")[2]
    assert "10.0/10.0 s" in last and "3,000 done" in last
    assert "3 failed\n" in last  # closed: what follows goes on a line of its own


def test_the_progress_bar_stays_quiet_when_disabled_or_never_updated() -> None:
    stream = Terminal()
    assert not enabled_for(stream, True) and not enabled_for(io.StringIO(), False)
    quiet = ProgressBar(stream, False, 10.0)
    quiet.update(5.0, 1500, 3)
    quiet.close()
    ProgressBar(stream, True, 10.0).close()  # a run that failed before it started
    assert stream.getvalue() == ""
