"""The cost of one batch as three non-negative terms, and their weighted least-squares fit:
`cost(n, L) = fixed_s + per_sample_s * n*L + quadratic_s * n*L^2` for n samples padded to length
L (L = 1 for a fixed shape, where only `fixed_s + per_sample_s * n` is fitted).

Pure: plain floats in, plain floats out; no clock, no I/O, no numpy. Used by cost.py (the
calibration's fit and its online correction) on the event loop, once per finished batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

MIN_COST_S = 1e-6  # a batch never costs less than this: keeps every estimate positive
_SINGULAR = 1e-12  # a normalised system whose determinant is below this has no unique answer


@dataclass(frozen=True, slots=True)
class CostFit:
    """All terms >= 0, so the cost is positive and never falls as n or L grows. per_sample_s is
    per token (per sample per unit of length) where a length varies; quadratic_s, per sample
    per length squared, is what attention adds (0 for a fixed shape)."""

    fixed_s: float
    per_sample_s: float
    quadratic_s: float = 0.0

    def cost_s(self, samples: int, length: int = 1) -> float:
        per_sample = self.per_sample_s + self.quadratic_s * length
        return max(MIN_COST_S, self.fixed_s + per_sample * (samples * length))

    def at_length(self, length: int) -> CostFit:
        """The same cost at one length, as a line in n (what a crossover compares)."""
        return CostFit(self.fixed_s, (self.per_sample_s + self.quadratic_s * length) * length)


@dataclass(frozen=True, slots=True)
class FitSums:
    """Weighted sums for least squares of y = a + b u + c v, with u = n L (tokens) and
    v = n L^2, and the shortest and longest length summed (c is fitted only between them)."""

    w: float = 0.0
    wu: float = 0.0
    wv: float = 0.0
    wuu: float = 0.0
    wuv: float = 0.0
    wvv: float = 0.0
    wy: float = 0.0
    wuy: float = 0.0
    wvy: float = 0.0
    wyy: float = 0.0
    shortest: float = math.inf
    longest: float = 0.0

    def add(self, n: float, y: float, weight: float, length: int = 1) -> FitSums:
        u = n * length
        v = u * length
        return FitSums(
            self.w + weight,
            self.wu + weight * u,
            self.wv + weight * v,
            self.wuu + weight * u * u,
            self.wuv + weight * u * v,
            self.wvv + weight * v * v,
            self.wy + weight * y,
            self.wuy + weight * u * y,
            self.wvy + weight * v * y,
            self.wyy + weight * y * y,
            min(self.shortest, length),
            max(self.longest, length),
        )

    def _values(self) -> tuple[float, ...]:
        sums = (self.w, self.wu, self.wv, self.wuu, self.wuv, self.wvv, self.wy, self.wuy)
        return (*sums, self.wvy, self.wyy)

    def scaled(self, factor: float) -> FitSums:
        return _sums([factor * s for s in self._values()], self.shortest, self.longest)

    def plus(self, other: FitSums) -> FitSums:
        values = [a + b for a, b in zip(self._values(), other._values(), strict=True)]
        return _sums(values, min(self.shortest, other.shortest), max(self.longest, other.longest))


def weighted_sums(rows: Iterable[tuple[float, int, float, float]]) -> FitSums:
    """The sums of (n, length, y, weight) rows at once (add() builds a FitSums per row: this
    is the router's path, once per finished batch)."""
    acc = [0.0] * 10
    shortest, longest = math.inf, 0.0
    for n, length, y, weight in rows:
        u = n * length
        v = u * length
        wu, wv = weight * u, weight * v
        acc[0] += weight
        acc[1] += wu
        acc[2] += wv
        acc[3] += wu * u
        acc[4] += wu * v
        acc[5] += wv * v
        acc[6] += weight * y
        acc[7] += wu * y
        acc[8] += wv * y
        acc[9] += weight * y * y
        shortest, longest = min(shortest, length), max(longest, length)
    return _sums(acc, shortest, longest)


def _sums(values: list[float], shortest: float, longest: float) -> FitSums:
    w, wu, wv, wuu, wuv, wvv, wy, wuy, wvy, wyy = values
    return FitSums(w, wu, wv, wuu, wuv, wvv, wy, wuy, wvy, wyy, shortest, longest)


def solve(sums: FitSums) -> CostFit | None:
    """The least-squares cost with every term >= 0; None without any weight. At one length
    (every fixed shape) a line in u = n L; over several, all three terms."""
    if sums.w <= 0.0:
        return None
    if sums.longest > sums.shortest:
        return _solve_three(sums)
    return _solve_line(sums)


def _solve_line(sums: FitSums) -> CostFit:
    """y = a + b u, held to a >= 0 and b >= 0 (exactly the non-negative least squares)."""
    det = sums.w * sums.wuu - sums.wu * sums.wu
    if det <= 1e-12 * sums.w * max(sums.wuu, 1e-300):
        return CostFit(sums.wy / sums.w, 0.0)  # one batch size only: no slope to see
    b = (sums.w * sums.wuy - sums.wu * sums.wy) / det
    a = (sums.wy - b * sums.wu) / sums.w
    if b < 0.0:  # bigger batches measured cheaper: noise; a flat cost is the honest reading
        return CostFit(max(0.0, sums.wy / sums.w), 0.0)
    if a < 0.0:  # a line through the origin, refitted
        return CostFit(0.0, max(0.0, sums.wuy / sums.wuu))
    return CostFit(a, b)


def _solve_three(sums: FitSums) -> CostFit:
    """Non-negative least squares over (1, u, v) by enumerating which terms are free: the
    optimum is the unconstrained optimum of its own free terms, so it is the feasible one of
    those with the least residual (a feasible optimum of all three is the answer at once).
    The system is normalised to a unit diagonal first (u and v run to 1e4 and 1e7, their
    weighted sums far beyond)."""
    gram = (
        (sums.w, sums.wu, sums.wv),
        (sums.wu, sums.wuu, sums.wuv),
        (sums.wv, sums.wuv, sums.wvv),
    )
    rhs = (sums.wy, sums.wuy, sums.wvy)
    scale = [1.0 / math.sqrt(gram[i][i]) if gram[i][i] > 0.0 else 0.0 for i in range(3)]
    best: tuple[float, ...] = (0.0, 0.0, 0.0)
    best_residual = sums.wyy
    for size in (3, 2, 1):
        for free in itertools.combinations(range(3), size):
            if any(scale[i] == 0.0 for i in free):
                continue
            matrix = [[gram[i][j] * scale[i] * scale[j] for j in free] for i in free]
            vector = [rhs[i] * scale[i] for i in free]
            z = _solve_small(matrix, vector)
            if z is None or any(zi < 0.0 for zi in z):
                continue
            residual = sums.wyy - sum(zi * vi for zi, vi in zip(z, vector, strict=True))
            if residual < best_residual:
                coefficients = [0.0, 0.0, 0.0]
                for i, zi in zip(free, z, strict=True):
                    coefficients[i] = zi * scale[i]
                best, best_residual = tuple(coefficients), residual
        if best_residual < sums.wyy:  # the unconstrained optimum is feasible
            break
    return CostFit(*best)


def _solve_small(m: list[list[float]], r: list[float]) -> list[float] | None:
    """Cramer's rule for 1x1 to 3x3; None where the system is (nearly) singular."""
    det = _det(m)
    if abs(det) <= _SINGULAR:
        return None
    out = []
    for k in range(len(r)):
        replaced = [[r[i] if j == k else m[i][j] for j in range(len(r))] for i in range(len(r))]
        out.append(_det(replaced) / det)
    return out


def _det(m: list[list[float]]) -> float:
    if len(m) == 1:
        return m[0][0]
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )
