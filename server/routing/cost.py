"""What a batch of n samples costs on one device: `fixed_s + per_sample_s * n`, fitted to
calibration points and corrected online from observed batch times.

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

MIN_COST_S = 1e-6  # a batch never costs less than this: keeps every estimate positive
DECAY = 0.97  # per observed batch: the last ~30 batches carry the estimate
PRIOR_IMPORTANCE = 1.0  # the calibration counts as this many observed batches, forever


@dataclass(frozen=True, slots=True)
class CostFit:
    """cost(n) = fixed_s + per_sample_s * n, both >= 0: positive and monotone by construction."""

    fixed_s: float
    per_sample_s: float

    def cost_s(self, samples: int) -> float:
        return max(MIN_COST_S, self.fixed_s + self.per_sample_s * samples)


# Where nothing was measured: a second per batch, so that an uncalibrated executor is used only
# when it is the only one, until observed batches say what it really costs.
UNKNOWN_COST = CostFit(1.0, 0.0)


@dataclass(frozen=True, slots=True)
class FitSums:
    """Weighted sums for least squares of y = a + b n."""

    w: float = 0.0
    wn: float = 0.0
    wnn: float = 0.0
    wy: float = 0.0
    wny: float = 0.0

    def add(self, n: float, y: float, weight: float) -> FitSums:
        return FitSums(
            self.w + weight,
            self.wn + weight * n,
            self.wnn + weight * n * n,
            self.wy + weight * y,
            self.wny + weight * n * y,
        )

    def scaled(self, factor: float) -> FitSums:
        return FitSums(*(factor * v for v in (self.w, self.wn, self.wnn, self.wy, self.wny)))

    def plus(self, other: FitSums) -> FitSums:
        return FitSums(
            self.w + other.w,
            self.wn + other.wn,
            self.wnn + other.wnn,
            self.wy + other.wy,
            self.wny + other.wny,
        )


def solve(sums: FitSums) -> CostFit | None:
    """The least-squares line, held to a >= 0 and b >= 0; None without any weight."""
    if sums.w <= 0.0:
        return None
    det = sums.w * sums.wnn - sums.wn * sums.wn
    if det <= 1e-12 * sums.w * max(sums.wnn, 1e-300):
        return CostFit(sums.wy / sums.w, 0.0)  # one batch size only: no slope to see
    b = (sums.w * sums.wny - sums.wn * sums.wy) / det
    a = (sums.wy - b * sums.wn) / sums.w
    if b < 0.0:  # bigger batches measured cheaper: noise; a flat cost is the honest reading
        return CostFit(max(0.0, sums.wy / sums.w), 0.0)
    if a < 0.0:  # a line through the origin, refitted
        return CostFit(0.0, max(0.0, sums.wny / sums.wnn))
    return CostFit(a, b)


def relative_sums(points: Sequence[tuple[int, float]], importance: float) -> FitSums:
    """Sums over (samples, seconds) points, each weighted 1/y^2, scaled to `importance`."""
    sums = FitSums()
    for n, y in points:
        sums = sums.add(float(n), y, 1.0 / (y * y))
    return sums.scaled(importance / len(points)) if points else sums


def check_points(points: Sequence[tuple[int, float]]) -> list[str]:
    """Why a calibration cannot be used as it is (empty: fine). Plain sentences for the log."""
    problems = []
    if not points:
        return ["no measurements"]
    bad = [(n, y) for n, y in points if not (n >= 1 and math.isfinite(y) and y > 0.0)]
    if bad:
        problems.append(f"unusable measurements {bad}")
    if len({n for n, _ in points}) < 2:
        problems.append("only one batch size measured: the per-sample cost is unknown")
    ordered = sorted(points)
    for (n0, y0), (n1, y1) in itertools.pairwise(ordered):
        if y1 < 0.5 * y0:
            problems.append(f"batch {n1} measured at under half the time of batch {n0}")
    return problems


def fit_points(points: Sequence[tuple[int, float]]) -> CostFit:
    """The calibration's fit; measurements that are not positive and finite are left out."""
    good = [(n, y) for n, y in points if n >= 1 and math.isfinite(y) and y > 0.0]
    fit = solve(relative_sums(good, 1.0))
    return fit if fit is not None else CostFit(MIN_COST_S, 0.0)


def worst_relative_error(fit: CostFit, points: Sequence[tuple[int, float]]) -> float:
    return max((abs(fit.cost_s(n) - y) / y for n, y in points if y > 0.0), default=0.0)


def worst_misfit(fit: CostFit, points: Sequence[tuple[int, float]]) -> float:
    """How far the fit is off at its worst point, as a factor less one, either way: 1.0 is
    twice or half the measured time. (worst_relative_error never exceeds 1 for a fit that is
    too low, however far: it cannot tell 2x from 100x that way.)"""
    ratios = (fit.cost_s(n) / y for n, y in points if y > 0.0)
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

    points: tuple[tuple[int, float], ...]
    dropped: tuple[tuple[int, float], ...]
    problems: tuple[str, ...]
    misfit: float  # worst_misfit of the fit on `points`

    @property
    def rejected(self) -> bool:
        """Nothing usable, or a fit too far from its own measurements to route on."""
        return not self.points or self.misfit > MAX_MISFIT


def vet_points(points: Sequence[tuple[int, float]]) -> Vetted:
    """Checks a calibration and refits it without its outliers where it needs to: while the
    check finds problems or the fit misses a point by more than OUTLIER_MISFIT, the one point
    whose removal best fits the rest is left out, at most a quarter of them and never below
    two batch sizes. Each candidate is judged by a fit without it (the relative weighting lets
    a too-fast outlier pull the fit onto itself, so its own error would not show it)."""
    kept = [(n, y) for n, y in points if n >= 1 and math.isfinite(y) and y > 0.0]
    problems = tuple(check_points(points))
    dropped: list[tuple[int, float]] = []
    budget = len(kept) // 4

    def misses(sample: Sequence[tuple[int, float]]) -> float:
        return worst_misfit(fit_points(sample), sample)

    while len(dropped) < budget and len({n for n, _ in kept}) > 2:
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
    weighted relative to the current estimate at its size, prior and observations alike, so
    that their importances compare whichever way the calibration was wrong.
    """

    def __init__(self, points: Sequence[tuple[int, float]]) -> None:
        self._prior = [(n, y) for n, y in points if n >= 1 and math.isfinite(y) and y > 0.0]
        self.calibrated = fit_points(self._prior) if self._prior else UNKNOWN_COST
        self._online = FitSums()
        self.fit = self.calibrated
        self.observed = 0

    def observe(self, samples: int, seconds: float) -> CostFit:
        if not (samples >= 1 and math.isfinite(seconds) and seconds > 0.0):
            return self.fit
        predicted = self.fit.cost_s(samples)
        self._online = self._online.scaled(DECAY).add(
            float(samples), seconds, 1.0 / (predicted * predicted)
        )
        self.observed += 1
        prior = FitSums()
        for n, y in self._prior:  # none where nothing was measured: observations alone
            reference = self.fit.cost_s(n)
            prior = prior.add(float(n), y, PRIOR_IMPORTANCE / len(self._prior) / reference**2)
        fit = solve(prior.plus(self._online))
        if fit is not None:
            self.fit = fit
        return self.fit
