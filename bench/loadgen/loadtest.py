"""One load-test run end to end: read the model's inputs, build the body and the schedule, drive
the load, build the report and write the files asked for (JSON, Markdown, CSV, PNG).

CLI process (main thread); each step's I/O lives in its own module, this one only sequences.
"""

from __future__ import annotations

import csv
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.loadgen.fanout import run_load_blocking, run_on_loop
from bench.loadgen.markdown import LATENCY_KEYS, generator_warning, number, report_markdown
from bench.loadgen.payload import build_bodies
from bench.loadgen.plan import OPEN, LoadPlan
from bench.loadgen.progress import ProgressBar
from bench.loadgen.record import RequestRecord
from bench.loadgen.report import build_report
from bench.loadgen.schedule import build_schedule
from bench.loadgen.target import fetch_input_specs, parse_target


def run_loadtest(plan: LoadPlan, bar: ProgressBar) -> tuple[dict[str, Any], list[RequestRecord]]:
    target = parse_target(plan.url)
    specs = run_on_loop(lambda: fetch_input_specs(target, plan.model))
    bodies = build_bodies(
        specs,
        plan.samples_per_request,
        plan.input_path,
        plan.timeout_ms,
        plan.seed,
        plan.lengths,
    )
    schedule = build_schedule(plan.phases, plan.arrivals, plan.seed) if plan.mode == OPEN else None
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")  # a label, not a duration
    records, cpu_fractions = run_load_blocking(plan, bodies, schedule, bar)
    meta = {
        "tool": "microbatch loadtest",
        "started": started,
        "body_bytes": len(bodies[0]) if len(bodies) == 1 else sum(map(len, bodies)) / len(bodies),
        "lengths": plan.lengths.describe() if plan.lengths else None,
        "inputs": [spec.to_wire() for spec in specs],
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    return build_report(plan, records, meta, cpu_fractions), records


def write_outputs(
    report: dict[str, Any],
    records: list[RequestRecord],
    json_path: str | None,
    markdown_path: str | None,
    records_path: str | None,
    plot_dir: str | None,
) -> list[Path]:
    written = []
    if json_path:
        written.append(_write(json_path, json.dumps(report, indent=1, allow_nan=False) + "\n"))
    if markdown_path:
        written.append(_write(markdown_path, report_markdown(report)))
    if records_path:
        path = Path(records_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*RequestRecord._fields, "latency_ms"])
            writer.writerows([*r, f"{r.latency_ms:.3f}"] for r in records)
        written.append(path)
    if plot_dir:
        from bench.loadgen.plot import write_charts

        written += write_charts(report, Path(plot_dir))
    return written


def _write(path: str, text: str) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def brief(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    s = report["summary"]
    lat = s["latency_ms"]
    lines = [
        f"sent {s['sent']:,}  answered {s['answered']:,}  ok {s['ok']:,}  "
        f"offered {number(s['offered_rps'])} req/s  answers {number(s['throughput_rps'])} req/s  "
        f"ok {number(s['ok_rps'])} req/s",
        "latency ms: " + "  ".join(f"{k} {number(lat[k], 2)}" for k in LATENCY_KEYS),
        f"by status {s['by_status']}  mean batch size {number(s['mean_batch_size'])}  "
        f"devices {s['devices']}",
    ]
    if s["errors_by_code"]:
        lines.append(f"errors {s['errors_by_code']}")
    return "\n".join(lines)


def behind_warning(report: dict[str, Any]) -> str | None:
    text = generator_warning(report["summary"])
    return f"warning: {text}" if text else None
