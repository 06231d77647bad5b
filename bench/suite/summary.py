"""The bench's numbers: one Measurement per (round, model, configuration), their medians over
the rounds, the ratios between servers and ceilings, and the Markdown tables.

Pure (no I/O, no clock); runs in the CLI process after the measurements.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.loadgen.markdown import number, table

ECHO, APP_ECHO, UNBATCHED, DEFAULT = "echo", "app_echo", "unbatched", "default"
CONFIGS: tuple[str, ...] = (ECHO, APP_ECHO, UNBATCHED, DEFAULT)
LABELS = {
    ECHO: "HTTP ceiling (bare echo, aiohttp low-level server as microbatch uses)",
    APP_ECHO: "reference: the same echo through aiohttp's Application and router",
    UNBATCHED: "server, batching off (max_batch_size 1)",
    DEFAULT: "server, default config",
}
DRIVERS = {"wrk": "wrk (one thread)", "python": "the Python generator (several processes)"}
_MEDIAN_FIELDS = (
    "saturation_rps",
    "half_rate_rps",
    "half_p50_ms",
    "half_p99_ms",
    "half_ok_rps",
    "half_mean_batch",
    "lone_p50_ms",
)


@dataclass(frozen=True)
class Measurement:
    round: int
    model: str
    config: str
    saturation_rps: float
    saturation_errors: int  # non-2xx answers and socket errors while saturating
    half_rate_rps: float  # the open-loop rate offered: half of this round's saturation
    half_processes: int  # generator processes that sent it
    half_p50_ms: float | None
    half_p99_ms: float | None
    half_ok_rps: float
    half_errors: int
    half_behind: bool  # at half load the generator fell behind or kept a core busy
    half_mean_batch: float | None
    lone_p50_ms: float | None  # one sequential client


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(measurements: Sequence[Measurement]) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> config -> the median of each figure over the rounds (errors summed)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in measurements:
        out.setdefault(m.model, {}).setdefault(m.config, {})
    for model, configs in out.items():
        for config in configs:
            runs = [m for m in measurements if m.model == model and m.config == config]
            row: dict[str, Any] = {
                f: _median([getattr(m, f) for m in runs]) for f in _MEDIAN_FIELDS
            }
            row["saturation_rps_range"] = [
                min(m.saturation_rps for m in runs),
                max(m.saturation_rps for m in runs),
            ]
            row["saturation_errors"] = sum(m.saturation_errors for m in runs)
            row["half_errors"] = sum(m.half_errors for m in runs)
            row["half_behind_rounds"] = sum(m.half_behind for m in runs)
            row["rounds"] = len(runs)
            configs[config] = row
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(
    summary: dict[str, dict[str, dict[str, Any]]], model_loop: dict[str, list[dict[str, Any]]]
) -> dict[str, dict[str, float | None]]:
    out = {}
    for model, configs in summary.items():
        points = model_loop.get(model, [])
        ceiling = max((p["samples_per_s"] for p in points), default=None)
        one = next((p for p in points if p["batch_size"] == 1), None)
        one_sps = one["samples_per_s"] if one else None
        sat = {c: configs.get(c, {}).get("saturation_rps") for c in CONFIGS}
        lone = {c: configs.get(c, {}).get("lone_p50_ms") for c in CONFIGS}
        base = None
        if lone[ECHO] is not None and one is not None:
            base = lone[ECHO] + one["batch_ms"]
        out[model] = {
            "default_vs_model_ceiling": _ratio(sat[DEFAULT], ceiling),
            "default_vs_http_ceiling": _ratio(sat[DEFAULT], sat[ECHO]),
            "default_vs_app_echo": _ratio(sat[DEFAULT], sat[APP_ECHO]),
            "unbatched_vs_model_batch1": _ratio(sat[UNBATCHED], one_sps),
            "unbatched_vs_http_ceiling": _ratio(sat[UNBATCHED], sat[ECHO]),
            "batched_vs_unbatched": _ratio(sat[DEFAULT], sat[UNBATCHED]),
            "added_latency_unbatched_ms": _minus(lone[UNBATCHED], base),
            "added_latency_default_ms": _minus(lone[DEFAULT], base),
        }
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def as_dicts(measurements: Sequence[Measurement]) -> list[dict[str, Any]]:
    return [asdict(m) for m in measurements]


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def bench_markdown(result: dict[str, Any]) -> str:
    meta, summary, model_loop = result["meta"], result["summary"], result["model_loop"]
    rounds = result["settings"]["rounds"]
    lines = [
        f"Medians of {rounds} interleaved rounds. Saturation: {DRIVERS[meta['driver']]} with "
        f"{result['settings']['connections']} keep-alive connections. Latency at half "
        "saturation: the Python generator, open loop (Poisson), counted from the scheduled "
        "send time. Lone request: one sequential client.",
        "",
        _machine_line(meta),
        "",
    ]
    lines += _result_lines(summary, model_loop)
    if any(r["half_behind_rounds"] for c in summary.values() for r in c.values()):
        lines += [
            "",
            "\\* in at least one round the generator fell behind its schedule or kept its core "
            "over 90% busy: the figure may show the generator's limit as well as the server's.",
        ]
    lines += ["", *_ratio_lines(result["ratios"]), "", *_model_lines(model_loop, meta)]
    generator = result.get("generator")
    if generator:
        lines += ["", _generator_line(generator)]
    return "\n".join(lines) + "\n"


def _result_lines(
    summary: dict[str, dict[str, dict[str, Any]]], model_loop: dict[str, list[dict[str, Any]]]
) -> list[str]:
    rows = []
    for model, configs in summary.items():
        points = model_loop.get(model, [])
        best = max(points, key=lambda p: p["samples_per_s"], default=None)
        if best:
            one = next((p for p in points if p["batch_size"] == 1), best)
            rows.append(
                [
                    model,
                    f"model loop, in-process (best: batch {best['batch_size']})",
                    number(best["samples_per_s"], 0) + " samples/s",
                    "-",
                    "-",
                    "-",
                    number(one["batch_ms"], 3) + " (batch 1)",
                ]
            )
        for config in CONFIGS:
            row = configs.get(config)
            if row is None:
                continue
            behind = " *" if row["half_behind_rounds"] else ""
            rows.append(
                [
                    model,
                    LABELS[config],
                    number(row["saturation_rps"], 0),
                    "{} - {}".format(*(number(v, 0) for v in row["saturation_rps_range"])),
                    number(row["half_p50_ms"], 2) + behind,
                    number(row["half_p99_ms"], 2) + behind,
                    number(row["lone_p50_ms"], 3),
                ]
            )
    return table(
        [
            "model",
            "configuration",
            "saturation (req/s)",
            "min - max",
            "p50 at half (ms)",
            "p99 at half (ms)",
            "lone p50 (ms)",
        ],
        rows,
    )


def _ratio_lines(table_ratios: dict[str, dict[str, float | None]]) -> list[str]:
    rows = [
        [
            model,
            _x(r["default_vs_model_ceiling"]),
            _x(r["default_vs_http_ceiling"]),
            _x(r.get("default_vs_app_echo")),
            _x(r["unbatched_vs_model_batch1"]),
            _x(r["unbatched_vs_http_ceiling"]),
            _x(r["batched_vs_unbatched"]),
            number(r["added_latency_unbatched_ms"], 3),
            number(r["added_latency_default_ms"], 3),
        ]
        for model, r in table_ratios.items()
    ]
    header = [
        "model",
        "default / model ceiling",
        "default / HTTP ceiling",
        "default / Application echo",
        "unbatched / model batch-1",
        "unbatched / HTTP ceiling",
        "batched / unbatched",
        "added latency, unbatched (ms)",
        "added latency, default (ms)",
    ]
    note = "Added latency = server lone p50 - (echo lone p50 + model batch-1 time)."
    return [*table(header, rows), "", note]


def _model_lines(model_loop: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> list[str]:
    rows = [
        [model, str(p["batch_size"]), number(p["batch_ms"], 3), number(p["samples_per_s"], 0)]
        for model, points in model_loop.items()
        for p in points
    ]
    title = (
        f"Model loop ({meta['torch_threads']} torch thread(s), as one of the server's "
        f"{meta['server_cpu_workers']} CPU worker(s) gets):"
    )
    return [title, "", *table(["model", "batch", "ms per batch", "samples/s"], rows)]


def _generator_line(g: dict[str, Any]) -> str:
    return (
        f"Load generator, one process pinned to one core, closed loop ({g['concurrency']} "
        f"clients) against the echo server on the other core: {number(g['rps'], 0)} req/s at "
        f"{g['cpu_fraction']:.0%} of its core, i.e. {number(g['rps_per_cpu_s'], 0)} requests "
        "per CPU-second."
    )


def _machine_line(meta: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    return (
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['platform']}; Python "
        f"{meta['python']}; {versions}; wrk: {meta['wrk'] or 'not installed'}."
    )
