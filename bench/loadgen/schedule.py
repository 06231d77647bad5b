"""When each request of an open-loop run is due: phases of (rate, duration), turned into send
offsets by a Poisson or constant arrival process, and split between generator processes.

Pure (numpy only; no clock, no I/O); runs in the CLI process before any request is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.config import ConfigError

ARRIVALS: tuple[str, ...] = ("poisson", "constant")
MAX_REQUESTS = 5_000_000  # a bound on memory: one run's schedule and records


@dataclass(frozen=True)
class Phase:
    """A stretch of the run at one offered rate; rate 0 in a closed loop (no schedule there)."""

    rate_rps: float
    duration_s: float
    warmup: bool = False


@dataclass(frozen=True)
class Schedule:
    """Send offsets in seconds from the run's start (sorted) and the phase of each."""

    offsets_s: np.ndarray
    phase: np.ndarray
    phases: tuple[Phase, ...]

    def __len__(self) -> int:
        return len(self.offsets_s)

    @property
    def end_s(self) -> float:
        return sum(p.duration_s for p in self.phases)


def parse_steps(text: str) -> tuple[Phase, ...]:
    """`--schedule 100:10,200:10` -> 100 req/s for 10 s, then 200 req/s for 10 s."""
    phases = []
    for item in text.split(","):
        rate, sep, duration = item.strip().partition(":")
        try:
            phase = Phase(float(rate), float(duration))
        except ValueError:
            phase = None
        if not sep or phase is None:
            raise ConfigError(f"--schedule items must be RATE:SECONDS, got {item.strip()!r}")
        _check_phase(phase, "--schedule")
        phases.append(phase)
    if not phases:
        raise ConfigError("--schedule must name at least one RATE:SECONDS step")
    return tuple(phases)


def open_loop_phases(
    rate_rps: float | None, duration_s: float, warmup_s: float, steps: str | None
) -> tuple[Phase, ...]:
    """The run's phases: a warm-up at the first rate (not reported), then the steps or one rate."""
    if steps:
        measured = parse_steps(steps)
    elif rate_rps is not None:
        measured = (Phase(rate_rps, duration_s),)
        _check_phase(measured[0], "--rate/--duration")
    else:
        raise ConfigError("an open-loop run needs --rate or --schedule")
    if warmup_s < 0 or not math.isfinite(warmup_s):
        raise ConfigError(f"--warmup must be >= 0 seconds, got {warmup_s}")
    if warmup_s == 0:
        return measured
    return (Phase(measured[0].rate_rps, warmup_s, warmup=True), *measured)


def closed_loop_phases(duration_s: float, warmup_s: float) -> tuple[Phase, ...]:
    _check_phase(Phase(0.0, duration_s), "--duration")
    if warmup_s < 0 or not math.isfinite(warmup_s):
        raise ConfigError(f"--warmup must be >= 0 seconds, got {warmup_s}")
    measured = Phase(0.0, duration_s)
    return (Phase(0.0, warmup_s, warmup=True), measured) if warmup_s > 0 else (measured,)


def _check_phase(phase: Phase, flag: str) -> None:
    if not (math.isfinite(phase.rate_rps) and phase.rate_rps >= 0):
        raise ConfigError(f"{flag}: the rate must be a number >= 0, got {phase.rate_rps}")
    if not (math.isfinite(phase.duration_s) and phase.duration_s > 0):
        raise ConfigError(f"{flag}: the duration must be > 0 seconds, got {phase.duration_s}")


def build_schedule(phases: tuple[Phase, ...], arrivals: str, seed: int) -> Schedule:
    expected = sum(p.rate_rps * p.duration_s for p in phases)
    if expected > MAX_REQUESTS:
        raise ConfigError(
            f"the schedule holds about {expected:.0f} requests, at most {MAX_REQUESTS} per run; "
            "lower the rate or the duration"
        )
    if arrivals not in ARRIVALS:
        raise ConfigError(f"--arrivals must be one of {', '.join(ARRIVALS)}, got {arrivals!r}")
    rng = np.random.default_rng(seed)
    offsets, indexes = [], []
    start = 0.0
    for i, phase in enumerate(phases):
        if arrivals == "constant":
            times = _constant(phase.rate_rps, phase.duration_s)
        else:
            times = _poisson(rng, phase.rate_rps, phase.duration_s)
        offsets.append(start + times)
        indexes.append(np.full(len(times), i, dtype=np.int32))
        start += phase.duration_s
    return Schedule(np.concatenate(offsets), np.concatenate(indexes), phases)


def _constant(rate_rps: float, duration_s: float) -> np.ndarray:
    count = math.floor(rate_rps * duration_s + 1e-9)
    return np.arange(count, dtype=np.float64) / rate_rps if count else np.zeros(0)


def _poisson(rng: np.random.Generator, rate_rps: float, duration_s: float) -> np.ndarray:
    if rate_rps == 0:
        return np.zeros(0)
    # Draw more gaps than the mean needs (six standard deviations), topping up if ever short.
    mean = rate_rps * duration_s
    times = np.zeros(0)
    for _ in range(100):
        draw = int(mean + 6 * math.sqrt(mean) + 16)
        last = times[-1] if len(times) else 0.0
        times = np.concatenate((times, last + np.cumsum(rng.exponential(1 / rate_rps, draw))))
        if times[-1] >= duration_s:
            break
    return times[times < duration_s]


def split_schedule(schedule: Schedule, parts: int) -> list[Schedule]:
    """Deal the requests round-robin, so that each process sends 1/parts of every phase."""
    return [
        Schedule(schedule.offsets_s[k::parts], schedule.phase[k::parts], schedule.phases)
        for k in range(parts)
    ]


def phase_windows(phases: tuple[Phase, ...]) -> list[tuple[float, float]]:
    """(start_s, end_s) of each phase, from the run's start."""
    windows, start = [], 0.0
    for phase in phases:
        windows.append((start, start + phase.duration_s))
        start += phase.duration_s
    return windows
