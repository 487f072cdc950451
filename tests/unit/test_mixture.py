"""The normal-mixture martingale, its boundary and tuning, against independent scipy formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special, stats

from armguard.detectors import _mixture


def _scipy_log_mixture(z, ct, sided):
    z = np.asarray(z, dtype=float)
    shrink = ct / (1 + ct)
    value = -0.5 * np.log1p(ct) + 0.5 * shrink * z * z
    if sided == "one":
        value = value + np.log(2.0) + special.log_ndtr(z * np.sqrt(shrink))
    return value


@pytest.mark.parametrize("sided", ["one", "two"])
def test_log_mixture_matches_scipy_scalar_and_vectorised(sided):
    z = np.linspace(-45.0, 12.0, 301)
    for ct in (1e-3, 0.1, 1.0, 7.0, 300.0):
        expected = np.minimum(_scipy_log_mixture(z, ct, sided), _mixture.LOG_E_CAP)
        got = _mixture.log_mixture_array(z, np.full_like(z, ct), sided)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
        scalar = [_mixture.log_mixture(float(v), ct, sided) for v in z]
        np.testing.assert_allclose(scalar, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sided", ["one", "two"])
def test_mixture_is_the_integral_of_likelihood_ratios(sided):
    # M(z, t) = E_theta exp(theta W - theta^2 t / 2) with W = z sqrt(t), theta ~ N(0, c) or the
    # half-normal: check the closed form by numerical integration.
    c, t, z = 3.0, 0.7, 1.3
    w = z * math.sqrt(t)
    sd = math.sqrt(c)

    def integrand(theta):
        density = stats.norm.pdf(theta, scale=sd) * (2.0 if sided == "one" else 1.0)
        return math.exp(theta * w - theta * theta * t / 2) * density

    lo = 0.0 if sided == "one" else -np.inf
    value, _ = integrate.quad(integrand, lo, np.inf)
    assert _mixture.log_mixture(z, c * t, sided) == pytest.approx(math.log(value), rel=1e-8)


@pytest.mark.parametrize("sided", ["one", "two"])
@pytest.mark.parametrize("alpha", [0.05, 0.001])
def test_boundary_inverts_the_mixture(sided, alpha):
    for ct in (0.01, 0.5, 1.0, 10.0, 1e4):
        b = _mixture.boundary(ct, -math.log(alpha), sided)
        assert _mixture.log_mixture(b, ct, sided) == pytest.approx(-math.log(alpha), abs=1e-9)
        # wider than the fixed-sample normal quantile at the same level
        q = stats.norm.ppf(1 - alpha if sided == "one" else 1 - alpha / 2)
        assert b > q


@pytest.mark.parametrize("sided", ["one", "two"])
@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.001])
def test_tuning_constant_makes_the_boundary_tightest_at_t_equal_1(sided, alpha):
    c = _mixture.tuning_constant(alpha, sided)
    lt = -math.log(alpha)
    best = _mixture.boundary(c, lt, sided)
    for factor in (0.5, 0.8, 1.25, 2.0):
        assert _mixture.boundary(c * factor, lt, sided) > best
    if sided == "two":
        # the known closed-form approximation of Howard et al. (2021), eq. (3.12)
        approx = -2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)
        assert c == pytest.approx(approx, rel=0.15)


def test_fieller_interval_contains_the_ratio_and_inverts_the_test():
    lo, hi = _mixture.fieller(10.5, 10.0, 0.04, 0.03, 2.5)
    assert lo < 1.05 < hi
    for k in (lo, hi):
        assert abs(10.5 - k * 10.0) == pytest.approx(2.5 * math.sqrt(0.04 + k * k * 0.03))
    assert _mixture.fieller(0.1, 0.1, 0.04, 0.03, 2.5) is None


def test_log_norm_cdf_far_tail():
    for x in (-5.0, -29.9, -30.1, -40.0, -300.0):
        assert _mixture.log_norm_cdf(x) == pytest.approx(special.log_ndtr(x), rel=1e-9)
