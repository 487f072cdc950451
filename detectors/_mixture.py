"""Normal-mixture martingales and confidence sequences shared by the two-arm tests (private).

Model. At a look with ``n_t`` and ``n_c`` values, the estimate ``d`` of a linear contrast of the
arm means has standard error ``se``; ``z = (d - d0) / se`` and ``t = n_eff / tuning_n`` with
``n_eff = 2 / (1/n_t + 1/n_c)`` (the per-arm sample size of a balanced design with the same
information). Under the null boundary ``d = d0`` the process ``z * sqrt(t)`` behaves
asymptotically like a standard Brownian motion in ``t`` (Waudby-Smith et al. 2023), so a mixture
of its exponential martingales ``exp(theta z sqrt(t) - theta^2 t / 2)`` over ``theta ~ N(0, c)``
(two-sided) or the half-normal on ``theta >= 0`` (one-sided) is a test martingale and Ville's
inequality bounds the chance it ever exceeds ``1 / alpha`` (Robbins 1970; Johari et al. 2017;
Howard et al. 2021):

* two-sided  ``log M = -log(1 + c t)/2 + c t z^2 / (2 (1 + c t))``
* one-sided  ``log M = log 2 - log(1 + c t)/2 + c t z^2 / (2 (1 + c t))
  + log Phi(z sqrt(c t / (1 + c t)))``

The mixing variance ``c`` is chosen so that the boundary on ``z`` is smallest at ``t = 1``,
that is at ``n_eff = tuning_n``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_LOG2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# e-values are reported as floats: cap the log so exp() stays finite and JSON-safe.
LOG_E_CAP = 700.0
# Below this, erfc would underflow: log Phi comes from its asymptotic series (error < 1e-13).
_TAIL = -30.0

SIDES = ("one", "two")


def log_norm_cdf(x: float) -> float:
    """log Phi(x), accurate in the far left tail."""
    if x > _TAIL:
        return math.log(0.5 * math.erfc(-x / _SQRT2))
    # asymptotic series: Phi(x) ~ phi(x) / |x| * (1 - 1/x^2 + 3/x^4 - 15/x^6 + 105/x^8)
    u = 1.0 / (x * x)
    series = u * (-1.0 + u * (3.0 + u * (-15.0 + u * 105.0)))
    return -0.5 * x * x - math.log(-x) - _LOG_SQRT_2PI + math.log1p(series)


def log_mixture(z: float, ct: float, sided: str) -> float:
    """log of the mixture martingale at standardised statistic ``z`` and ``ct = c * t``."""
    if math.isinf(z):
        return LOG_E_CAP if (z > 0 or sided == "two") else -LOG_E_CAP
    shrink = ct / (1.0 + ct)
    value = -0.5 * math.log1p(ct) + 0.5 * shrink * z * z
    if sided == "one":
        value += _LOG2 + log_norm_cdf(z * math.sqrt(shrink))
    return min(value, LOG_E_CAP)


_erfc = np.frompyfunc(math.erfc, 1, 1)


def log_norm_cdf_array(x: np.ndarray) -> np.ndarray:
    """Vectorised :func:`log_norm_cdf`."""
    x = np.asarray(x, dtype=np.float64)
    x_left = np.minimum(x, _TAIL)
    u = 1.0 / (x_left * x_left)
    series = u * (-1.0 + u * (3.0 + u * (-15.0 + u * 105.0)))
    tail = -0.5 / u - np.log(-x_left) - _LOG_SQRT_2PI + np.log1p(series)
    with np.errstate(divide="ignore"):
        centre = np.log(0.5 * np.asarray(_erfc(-np.maximum(x, _TAIL) / _SQRT2), dtype=np.float64))
    return np.where(x > _TAIL, centre, tail)


def log_truncated_mixture(u: float, mu: float, rho: float) -> float:
    """log of the one-sided mixture with a normal prior truncated to harmful effects.

    The estimate of the contrast is ``d ~ N(delta, se^2)`` and the harmful side is
    ``delta > 0``; the likelihood ratios ``exp((delta d - delta^2 / 2) / se^2)`` are mixed over
    ``delta ~ N(m, v)`` restricted to ``delta >= 0``. In standard-error units,
    ``u = d / se``, ``mu = m / se``, ``rho = se^2 / v``:

    ``log M = (u + mu rho)^2 / (2 (1 + rho)) - mu^2 rho / 2 - log(1 + 1/rho) / 2
    + log Phi((u + mu rho) / sqrt(1 + rho)) - log Phi(mu sqrt(rho))``.

    ``mu = 0`` is the half-normal mixture (``rho = 1 / (c t)``) of :func:`log_mixture`.
    """
    if math.isinf(u):
        return LOG_E_CAP if u > 0 else -LOG_E_CAP
    w = u + mu * rho
    value = (
        w * w / (2.0 * (1.0 + rho))
        - 0.5 * mu * mu * rho
        - 0.5 * math.log1p(1.0 / rho)
        + log_norm_cdf(w / math.sqrt(1.0 + rho))
        - log_norm_cdf(mu * math.sqrt(rho))
    )
    return min(value, LOG_E_CAP)


def log_truncated_mixture_array(u: np.ndarray, mu: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Vectorised :func:`log_truncated_mixture`."""
    u = np.asarray(u, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        w = u + mu * rho
        value = (
            w * w / (2.0 * (1.0 + rho))
            - 0.5 * mu * mu * rho
            - 0.5 * np.log1p(1.0 / rho)
            + log_norm_cdf_array(w / np.sqrt(1.0 + rho))
            - log_norm_cdf_array(mu * np.sqrt(rho))
        )
        value = np.where(np.isinf(u), np.where(u > 0, LOG_E_CAP, -LOG_E_CAP), value)
    return np.minimum(value, LOG_E_CAP)


def log_mean_exp(a: float, b: float) -> float:
    """log((exp(a) + exp(b)) / 2) without overflow."""
    hi, lo = (a, b) if a >= b else (b, a)
    return hi + math.log1p(math.exp(lo - hi)) - _LOG2


def solve_increasing(f, target: float, start: float = 4.0) -> float:
    """Smallest ``x >= 0`` with ``f(x) >= target`` for ``f`` increasing on [0, inf)."""
    if f(0.0) >= target:
        return 0.0
    hi = start
    while f(hi) < target:
        hi *= 2.0
        if hi > 1e6:
            return hi
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def log_mixture_array(z: np.ndarray, ct: np.ndarray, sided: str) -> np.ndarray:
    """Vectorised :func:`log_mixture` (for simulations over many paths)."""
    z = np.asarray(z, dtype=np.float64)
    ct = np.asarray(ct, dtype=np.float64)
    shrink = ct / (1.0 + ct)
    with np.errstate(invalid="ignore", over="ignore"):
        value = -0.5 * np.log1p(ct) + 0.5 * shrink * z * z
        if sided == "one":
            value = value + _LOG2 + log_norm_cdf_array(z * np.sqrt(shrink))
        value = np.where(
            np.isinf(z), np.where((z > 0) | (sided == "two"), LOG_E_CAP, -LOG_E_CAP), value
        )
    return np.minimum(value, LOG_E_CAP)


def boundary(ct: float, log_threshold: float, sided: str) -> float:
    """Smallest ``z >= 0`` with ``log_mixture(z, ct, sided) >= log_threshold``."""
    two = math.sqrt((1.0 + ct) / ct * (2.0 * log_threshold + math.log1p(ct)))
    if sided == "two":
        return two
    # One-sided: M1 = 2 Phi(.) M2 lies between M2 and 2 M2 for z >= 0, so the boundary lies
    # between the two-sided boundaries at thresholds 1/alpha and 1/(2 alpha).
    lo = math.sqrt(max((1.0 + ct) / ct * (2.0 * (log_threshold - _LOG2) + math.log1p(ct)), 0.0))
    hi = two
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if log_mixture(mid, ct, "one") >= log_threshold:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


@lru_cache(maxsize=256)
def tuning_constant(alpha: float, sided: str) -> float:
    """Mixing variance ``c`` minimising the boundary at ``t = 1`` (golden-section on log c)."""
    log_threshold = -math.log(alpha)
    a, b = math.log(1e-3), math.log(1e4)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    x1 = b - inv_phi * (b - a)
    x2 = a + inv_phi * (b - a)
    f1 = boundary(math.exp(x1), log_threshold, sided)
    f2 = boundary(math.exp(x2), log_threshold, sided)
    for _ in range(80):
        if f1 < f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - inv_phi * (b - a)
            f1 = boundary(math.exp(x1), log_threshold, sided)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + inv_phi * (b - a)
            f2 = boundary(math.exp(x2), log_threshold, sided)
        if b - a < 1e-9:
            break
    return math.exp(0.5 * (a + b))


def fieller(
    mean_t: float, mean_c: float, var_t: float, var_c: float, b: float
) -> tuple[float, float] | None:
    """Set of ratios ``k`` with ``|mean_t - k mean_c| <= b sqrt(var_t + k^2 var_c)``.

    ``var_t`` and ``var_c`` are the variances of the two means. Returns ``(k_lo, k_hi)``, or None
    when the set is unbounded (the control mean is within ``b`` standard errors of 0).
    """
    a2 = mean_c * mean_c - b * b * var_c
    if a2 <= 0.0:
        return None
    disc = b * b * (var_t * mean_c * mean_c + var_c * mean_t * mean_t - b * b * var_t * var_c)
    root = math.sqrt(max(disc, 0.0))
    centre = mean_t * mean_c
    return (centre - root) / a2, (centre + root) / a2
