"""What a batch costs on one device, `a + b*n*L + c*n*L^2` for n samples padded to length L
(cost_fit.py; L = 1 and c = 0 for a fixed shape), fitted to calibration points and corrected
online from observed batch times; and the sanity check of a calibration.

Pure: plain floats in, plain floats out; no clock, no I/O, no torch. The router owns one
OnlineCost per (model, device) on the event loop and feeds it each finished batch.

The fit minimises relative error (each point weighted by 1 / time^2), so that a 0.2 ms
single-sample batch counts as much as a 20 ms full one: the crossover between devices lies at
small batches, where an absolute fit would be dominated by the big ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from server.routing.cost_fit import MIN_COST_S as MIN_COST_S
from server.routing.cost_fit import CostFit as CostFit
from server.routing.cost_fit import FitSums as FitSums
from server.routing.cost_fit import solve as solve
from server.routing.cost_fit import weighted_sums

DECAY = 0.97  # per observed batch: the last ~30 batches carry the estimate
PRIOR_IMPORTANCE = 1.0  # the calibration counts as this many observed batches, forever

# A measured point: (samples, seconds) for a fixed shape, or (samples, length, seconds) for a
# model with a dynamic dimension (a pair is read as length 1).
Point = tuple[int, float] | tuple[int, int, float]

# Where nothing was measured: a second per batch, so that an uncalibrated executor is used only
# when it is the only one, until observed batches say what it really costs.
UNKNOWN_COST = CostFit(1.0, 0.0)


def spread(point: Point) -> tuple[int, int, float]:
    """(samples, length, seconds)."""
    if len(point) == 2:
        return point[0], 1, point[1]
    return point


def usable(point: Point) -> bool:
    n, length, y = spread(point)
    return n >= 1 and length >= 1 and math.isfinite(y) and y > 0.0


def relative_sums(points: Sequence[Point], importance: float) -> FitSums:
    """Sums over measured points, each weighted 1/y^2, scaled to `importance`."""
    sums = weighted_sums((n, length, y, 1.0 / (y * y)) for n, length, y in map(spread, points))
    return sums.scaled(importance / len(points)) if points else sums


def check_points(points: Sequence[Point]) -> list[str]:
    """Why a calibration cannot be used as it is (empty: fine). Plain sentences for the log."""
    problems = []
    if not points:
        return ["no measurements"]
    bad = [p for p in points if not usable(p)]
    if bad:
        problems.append(f"unusable measurements {bad}")
    spread_points = [spread(p) for p in points]
    if len({n for n, _, _ in spread_points}) < 2:
        problems.append("only one batch size measured: the per-sample cost is unknown")
    return problems + _slower_when_bigger(spread_points)


def _slower_when_bigger(points: Sequence[tuple[int, int, float]]) -> list[str]:
    """A bigger batch (or, at one batch size, a longer one) measured at under half the time of
    the one below it: a burst of other load, or a broken profile."""
    problems = []
    for length in sorted({length for _, length, _ in points}):
        ordered = sorted((n, y) for n, l_, y in points if l_ == length)
        at = f" at length {length}" if length != 1 else ""
        for (n0, y0), (n1, y1) in itertools.pairwise(ordered):
            if y1 < 0.5 * y0:
                problems.append(f"batch {n1} measured at under half the time of batch {n0}{at}")
    for n in sorted({n for n, _, _ in points}):
        ordered = sorted((length, y) for n_, length, y in points if n_ == n)
        for (l0, y0), (l1, y1) in itertools.pairwise(ordered):
            if l1 > l0 and y1 < 0.5 * y0:
                problems.append(
                    f"length {l1} measured at under half the time of length {l0} (batch {n})"
                )
    return problems


def fit_points(points: Sequence[Point]) -> CostFit:
    """The calibration's fit; measurements that are not positive and finite are left out."""
    fit = solve(relative_sums([p for p in points if usable(p)], 1.0))
    return fit if fit is not None else CostFit(MIN_COST_S, 0.0)


def worst_relative_error(fit: CostFit, points: Sequence[Point]) -> float:
    spread_points = map(spread, points)
    return max(
        (abs(fit.cost_s(n, length) - y) / y for n, length, y in spread_points if y > 0.0),
        default=0.0,
    )


def worst_misfit(fit: CostFit, points: Sequence[Point]) -> float:
    """How far the fit is off at its worst point, as a factor less one, either way: 1.0 is
    twice or half the measured time. (worst_relative_error never exceeds 1 for a fit that is
    too low, however far: it cannot tell 2x from 100x that way.)"""
    ratios = (fit.cost_s(n, length) / y for n, length, y in map(spread, points) if y > 0.0)
    return max((max(r, 1.0 / r) - 1.0 for r in ratios), default=0.0)


# Misfits (worst_misfit). A line fitted to a clean profile is off by up to ~1.46x where a GPU's
# flat cost turns into a slope; past OUTLIER_MISFIT a point is more likely a burst of other
# load, and past MAX_MISFIT (2x or half at a measured size) the line is not worth routing on.
OUTLIER_MISFIT = 0.5
MAX_MISFIT = 1.0


@dataclass(frozen=True, slots=True)
class Vetted:
    """A calibration after its sanity check: the points its fit uses, the ones left out as
    outliers, what the check found in the raw points, and how far the fit misses its points."""

    points: tuple[Point, ...]
    dropped: tuple[Point, ...]
    problems: tuple[str, ...]
    misfit: float  # worst_misfit of the fit on `points`

    @property
    def rejected(self) -> bool:
        """Nothing usable, or a fit too far from its own measurements to route on."""
        return not self.points or self.misfit > MAX_MISFIT


def vet_points(points: Sequence[Point]) -> Vetted:
    """Checks a calibration and refits it without its outliers where it needs to: while the
    check finds problems or the fit misses a point by more than OUTLIER_MISFIT, the one point
    whose removal best fits the rest is left out, at most a quarter of them and never below
    two batch sizes. Each candidate is judged by a fit without it (the relative weighting lets
    a too-fast outlier pull the fit onto itself, so its own error would not show it)."""
    kept = [p for p in points if usable(p)]
    problems = tuple(check_points(points))
    dropped: list[Point] = []
    budget = len(kept) // 4

    def misses(sample: Sequence[Point]) -> float:
        return worst_misfit(fit_points(sample), sample)

    while len(dropped) < budget and len({p[0] for p in kept}) > 2:
        if not check_points(kept) and misses(kept) <= OUTLIER_MISFIT:
            break
        index = min(range(len(kept)), key=lambda i: misses(kept[:i] + kept[i + 1 :]))
        dropped.append(kept.pop(index))
    worst = misses(kept) if kept else math.inf
    return Vetted(tuple(kept), tuple(dropped), problems, worst)


class OnlineCost:
    """A fit seeded by calibration and pulled toward observed batch times.

    The calibration stays as a small prior that never decays, so that a long run of one batch
    size cannot make the slope unknowable; observations decay by DECAY per batch, so that after
    a few dozen batches they outweigh a wrong calibration about thirtyfold. Every point is
    weighted relative to the current estimate at its size and length, prior and observations
    alike, so that their importances compare whichever way the calibration was wrong.
    """

    def __init__(self, points: Sequence[Point]) -> None:
        self._prior = [spread(p) for p in points if usable(p)]
        self.calibrated = fit_points(self._prior) if self._prior else UNKNOWN_COST
        self._online = FitSums()
        self.fit = self.calibrated
        self.observed = 0

    def observe(self, samples: int, seconds: float, length: int = 1) -> CostFit:
        if not (samples >= 1 and length >= 1 and math.isfinite(seconds) and seconds > 0.0):
            return self.fit
        predicted = self.fit.cost_s(samples, length)
        self._online = self._online.scaled(DECAY).add(
            float(samples), seconds, 1.0 / (predicted * predicted), length
        )
        self.observed += 1
        share = PRIOR_IMPORTANCE / len(self._prior) if self._prior else 0.0
        prior = weighted_sums(  # none where nothing was measured: observations alone
            (n, at, y, share / self.fit.cost_s(n, at) ** 2) for n, at, y in self._prior
        )
        fit = solve(prior.plus(self._online))
        if fit is not None:
            self.fit = fit
        return self.fit
