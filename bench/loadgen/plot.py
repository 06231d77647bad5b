"""PNG charts of a load-test report: throughput and latency against offered load, the latency
CDF, the batch size histogram and latency over the run.

CLI process, after the run; imports matplotlib (Agg, no display) only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.loadgen.errors import LoadGenError

CHARTS = ("load.png", "latency_cdf.png", "batch_sizes.png", "latency_over_time.png")


def write_charts(report: dict[str, Any], directory: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoadGenError("--plot needs matplotlib: pip install 'microbatch[plot]'") from None
    directory.mkdir(parents=True, exist_ok=True)
    title = f"{report['settings']['model']} at {report['settings']['url']}"
    drawers = (_load, _cdf, _batch_sizes, _over_time)
    paths = []
    for name, draw in zip(CHARTS, drawers, strict=True):
        figure = plt.figure(figsize=(10, 4) if name == "load.png" else (6, 4))
        try:
            draw(figure, report)
            figure.suptitle(title, fontsize=10)
            figure.tight_layout()
            path = directory / name
            figure.savefig(path, dpi=100)
            paths.append(path)
        finally:
            plt.close(figure)
    return paths


def _load(figure: Any, report: dict[str, Any]) -> None:
    phases = report["phases"]
    open_loop = report["settings"]["mode"] == "open"
    x = [p["offered_rps"] if open_loop else p["throughput_rps"] for p in phases]
    xlabel = "offered load (req/s)" if open_loop else "throughput (req/s), closed loop"
    left, right = figure.subplots(1, 2)
    left.plot(x, [p["throughput_rps"] for p in phases], "o-", label="answers")
    left.plot(x, [p["ok_rps"] for p in phases], "s--", label="ok")
    if open_loop and x:
        left.plot([0, max(x)], [0, max(x)], ":", color="grey", label="offered")
    left.set(xlabel=xlabel, ylabel="req/s", title="throughput")
    left.legend()
    for key in ("p50", "p90", "p99"):
        values = [p["latency_ms"][key] for p in phases]
        right.plot(x, [v if v is not None else float("nan") for v in values], "o-", label=key)
    right.set(xlabel=xlabel, ylabel="latency (ms)", title="latency", yscale="log")
    right.legend()


def _cdf(figure: Any, report: dict[str, Any]) -> None:
    axes = figure.subplots()
    points = report["latency_cdf"]
    axes.plot([p[0] for p in points], [p[1] for p in points])
    axes.set(xlabel="latency (ms)", ylabel="fraction of requests", title="latency CDF")
    if points and points[0][0] > 0:
        axes.set_xscale("log")
    axes.grid(True, alpha=0.3)


def _batch_sizes(figure: Any, report: dict[str, Any]) -> None:
    axes = figure.subplots()
    tally = report["summary"]["batch_size"]
    axes.bar([str(k) for k in tally], list(tally.values()))
    axes.set(xlabel="batch size", ylabel="requests", title="requests by the size of their batch")


def _over_time(figure: Any, report: dict[str, Any]) -> None:
    axes = figure.subplots()
    rows = report["latency_over_time"]
    mids = [(r["start_s"] + r["end_s"]) / 2 for r in rows]
    for key in ("p50_ms", "p99_ms"):
        axes.plot(mids, [r[key] if r[key] is not None else float("nan") for r in rows], "o-")
    axes.legend(["p50", "p99"])
    axes.set(xlabel="scheduled send time (s)", ylabel="latency (ms)", title="latency over the run")
