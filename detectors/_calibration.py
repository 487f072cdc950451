"""Shared calibration helpers for the drift and anomaly detectors (private).

Every detector here takes ``expected_run_length`` (evaluations between false alarms under no
change) and derives its threshold from it with one of the functions below, so thresholds are never
raw numbers picked by eye. Only the standard library is used so the detectors stay cheap to build.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

_NORMAL = NormalDist()

# Siegmund's correction for the overshoot of a CUSUM of standard normal increments over its
# boundary: E[overshoot] ~= -2 * zeta(1/2) / sqrt(2 pi) = 0.583, counted on both barriers.
_SIEGMUND_OVERSHOOT = 1.166


def check_run_length(expected_run_length: float) -> float:
    """Validate ``expected_run_length`` and return it as a float."""
    if isinstance(expected_run_length, bool) or not isinstance(expected_run_length, int | float):
        raise ValueError(f"expected_run_length must be a number > 1, got {expected_run_length!r}")
    if not math.isfinite(expected_run_length) or expected_run_length <= 1:
        raise ValueError(
            f"expected_run_length must be a finite number > 1, got {expected_run_length!r}"
        )
    return float(expected_run_length)


def normal_isf(alpha: float) -> float:
    """Upper ``alpha`` quantile of the standard normal distribution."""
    return _NORMAL.inv_cdf(1.0 - alpha)


def cusum_run_length(h: float, k: float) -> float:
    """Siegmund's approximation of the in-control run length of a one-sided CUSUM.

    ``S_t = max(0, S_{t-1} + z_t - k)`` with i.i.d. standard normal ``z_t``, alarm when
    ``S_t > h`` (Siegmund 1985, eq. 2.55): ``(exp(2 k b) - 2 k b - 1) / (2 k^2)`` with
    ``b = h + 1.166``.
    """
    b = h + _SIEGMUND_OVERSHOOT
    if k == 0.0:
        return b * b
    x = 2.0 * k * b
    return (math.exp(x) - x - 1.0) / (2.0 * k * k)


@lru_cache(maxsize=256)
def cusum_threshold(run_length: float, k: float) -> float:
    """Smallest CUSUM threshold ``h`` whose Siegmund run length reaches ``run_length``."""
    lo, hi = 0.0, 1.0
    while cusum_run_length(hi, k) < run_length:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if cusum_run_length(mid, k) < run_length:
            lo = mid
        else:
            hi = mid
    return hi


def _gamma_q(a: float, x: float) -> float:
    """Regularised upper incomplete gamma function Q(a, x) (Numerical Recipes 6.2)."""
    if x <= 0.0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        # Series for P(a, x).
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Lentz's continued fraction for Q(a, x).
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h


_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_exp = math.exp
_sqrt = math.sqrt
_erfc = math.erfc


def chi2_sf(x: float, df: float) -> float:
    """Survival function of the chi-square distribution with ``df`` degrees of freedom."""
    if x <= 0.0:
        return 1.0
    if df == int(df) and 1 <= df <= 200:
        return chi2_sf_int(x, int(df))
    return _gamma_q(0.5 * df, 0.5 * x)


# The divisors of the Poisson-sum terms as floats, for k up to _K_TABLE: ``h / 3.0`` is the
# IEEE division ``h / 3`` does, without converting an int on every term.
_K_TABLE = 200
_EVEN_DIVISORS = tuple(float(i) for i in range(1, _K_TABLE // 2))  # 1, 2, ..., 99
_ODD_DIVISORS = tuple(j + 0.5 for j in range(1, _K_TABLE // 2))  # 1.5, 2.5, ..., 99.5


def chi2_sf_int(x: float, k: int) -> float:
    """``chi2_sf(x, k)`` for an int ``k`` >= 1, without the checks (a hot path).

    The finite Poisson-sum form of Q(k / 2, x / 2), a few multiplications instead of the
    series or continued fraction (Abramowitz and Stegun 26.4.4-26.4.5). The terms are Poisson
    probabilities (<= 1, all positive), so nothing overflows or cancels. For ``k`` in
    [1, 200] the term divisors come from tables; the result is `_chi2_sf_int_loop`'s, the
    same operations in the same order, bit for bit.
    """
    if x <= 0.0:
        return 1.0
    if not 1 <= k <= _K_TABLE:
        return _chi2_sf_int_loop(x, k)
    h = 0.5 * x
    if k % 2 == 0:
        term = total = _exp(-h)
        for i in _EVEN_DIVISORS[: k // 2 - 1]:
            term *= h / i
            total += term
    else:
        root = _sqrt(h)
        total = _erfc(root)
        if k > 1:
            term = _exp(-h) * root * _TWO_OVER_SQRT_PI  # e^-h h^(1/2) / G(3/2)
            total += term
            for c in _ODD_DIVISORS[: k // 2 - 1]:
                term *= h / c
                total += term
    return total if total < 1.0 else 1.0


def _chi2_sf_int_loop(x: float, k: int) -> float:
    """`chi2_sf_int` with the divisors computed in the loop, for any int ``k``."""
    if x <= 0.0:
        return 1.0
    h = 0.5 * x
    if k % 2 == 0:
        term = total = _exp(-h)
        for i in range(1, k // 2):
            term *= h / i
            total += term
    else:
        root = _sqrt(h)
        total = _erfc(root)
        term = _exp(-h) * root * _TWO_OVER_SQRT_PI  # e^-h h^(1/2) / G(3/2)
        for j in range(1, k // 2 + 1):
            total += term
            term *= h / (j + 0.5)
    return total if total < 1.0 else 1.0


@lru_cache(maxsize=1024)
def chi2_isf(alpha: float, df: float) -> float:
    """Upper ``alpha`` quantile of the chi-square distribution (bisection on ``chi2_sf``)."""
    lo, hi = 0.0, max(1.0, df)
    while chi2_sf(hi, df) > alpha:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if chi2_sf(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution (limit of sqrt(n) * KS under no change)."""
    if x <= 0.0:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * x * x)
        total += term if j % 2 else -term
        if term < 1e-18:
            break
    return min(1.0, max(0.0, 2.0 * total))


@lru_cache(maxsize=64)
def kolmogorov_isf(alpha: float) -> float:
    """Upper ``alpha`` quantile of the Kolmogorov distribution."""
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if kolmogorov_sf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


# Mean of the Kolmogorov distribution: sqrt(pi / 2) * ln 2.
KOLMOGOROV_MEAN = math.sqrt(math.pi / 2.0) * math.log(2.0)
