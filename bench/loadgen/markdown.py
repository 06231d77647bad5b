"""A load-test report (the dict of report.py) as a Markdown summary.

Pure text formatting; runs in the CLI process. Missing figures print as "-".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LATENCY_KEYS = ("p50", "p90", "p99", "p99.9", "max")


def number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    settings, summary = report["settings"], report["summary"]
    lines = [f"# Load test: {settings['model']} at {settings['url']}", ""]
    lines += [_describe(settings), ""]
    lag = summary["schedule_lag"]
    warning = generator_warning(summary)
    if warning:
        lines += [f"**Warning:** {warning}", ""]
    lines += ["## Throughput", ""]
    lines += table(
        ["", "sent", "answered", "ok", "offered req/s", "answers req/s", "ok req/s"],
        [_traffic_row("whole run", summary)]
        + [_traffic_row(f"phase {i + 1}", p) for i, p in enumerate(report["phases"])],
    )
    lines += ["", "## Latency (ms, successful requests, from the scheduled send time)", ""]
    lines += table(
        ["", *LATENCY_KEYS],
        [_latency_row("whole run", summary["latency_ms"])]
        + [_latency_row(f"phase {i + 1}", p["latency_ms"]) for i, p in enumerate(report["phases"])]
        + [
            _latency_row("server queue_ms", summary["queue_ms"]),
            _latency_row("server compute_ms", summary["compute_ms"]),
        ],
    )
    lines += ["", "## Answers", ""]
    lines += _counts_lines("By status", summary["by_status"])
    lines += _counts_lines("Errors by code", summary["errors_by_code"])
    lines += _counts_lines("Requests by batch size", summary["batch_size"])
    lines += _counts_lines("Requests by device", summary["devices"])
    wait = summary["connection_wait_ms"]
    cpu = ", ".join(f"{f:.0%}" for f in summary["generator"]["cpu_fraction"])
    lines += [
        f"Schedule lag: p50 {number(lag['p50_ms'], 2)} ms, p99 {number(lag['p99_ms'], 2)} ms, "
        f"max {number(lag['max_ms'], 2)} ms. Wait for a free connection: p50 "
        f"{number(wait['p50'], 2)} ms, p99 {number(wait['p99'], 2)} ms. Generator CPU (share "
        f"of a core, per process): {cpu}.",
        "",
    ]
    return "\n".join(lines)


def generator_warning(summary: dict[str, Any]) -> str | None:
    """Why the figures may show the generator's limits rather than the server's, if they may."""
    lag, generator = summary["schedule_lag"], summary["generator"]
    reasons = []
    if lag["fell_behind"]:
        reasons.append(
            f"it fell behind its schedule ({lag['late_fraction']:.1%} of requests released over "
            f"{lag['threshold_ms']:g} ms late, max {number(lag['max_ms'])} ms)"
        )
    if generator["saturated"]:
        busiest = max(generator["cpu_fraction"])
        reasons.append(f"a generator process kept its core {busiest:.0%} busy")
    if not reasons:
        return None
    return (
        f"the generator may have been the bottleneck: {'; '.join(reasons)}. Latency still "
        "counts from the schedule; use more --processes or a lower rate."
    )


def _describe(settings: dict[str, Any]) -> str:
    measured = [p for p in settings["phases"] if not p["warmup"]]
    warmup = sum(p["duration_s"] for p in settings["phases"] if p["warmup"])
    if settings["mode"] == "open":
        steps = ", ".join(f"{p['rate_rps']:g} req/s for {p['duration_s']:g} s" for p in measured)
        load = f"Open loop ({settings['arrivals']} arrivals): {steps}"
    else:
        seconds = sum(p["duration_s"] for p in measured)
        load = f"Closed loop: {settings['concurrency']} clients for {seconds:g} s"
    return (
        f"{load}; warm-up {warmup:g} s; {settings['samples_per_request']} sample(s) per request; "
        f"{settings['processes']} generator process(es); input: "
        f"{settings['input_path'] or 'random'}."
    )


def _traffic_row(name: str, t: dict[str, Any]) -> list[str]:
    return [
        name,
        number(t["sent"]),
        number(t["answered"]),
        number(t["ok"]),
        number(t.get("offered_rps")),
        number(t["throughput_rps"]),
        number(t["ok_rps"]),
    ]


def _latency_row(name: str, pct: dict[str, Any]) -> list[str]:
    return [name, *(number(pct[k], 2) for k in LATENCY_KEYS)]


def _counts_lines(title: str, tally: dict[str, int]) -> list[str]:
    if not tally:
        return [f"{title}: none.", ""]
    total = sum(tally.values())
    items = ", ".join(f"{k}: {v:,} ({v / total:.1%})" for k, v in tally.items())
    return [f"{title}: {items}.", ""]
