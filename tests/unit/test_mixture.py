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


@pytest.mark.parametrize(("mu", "rho"), [(0.0, 0.3), (2.0, 1.0), (5.0, 0.16), (0.5, 16.0)])
def test_truncated_mixture_is_the_integral_of_likelihood_ratios(mu, rho):
    # d ~ N(delta, se^2) with se = 1: LR(delta) = exp(delta u - delta^2 / 2), delta ~ N(mu, 1/rho)
    # truncated to delta >= 0.
    sd = 1.0 / math.sqrt(rho)
    mass = stats.norm.sf(0.0, loc=mu, scale=sd)
    for u in (-2.0, 0.0, 1.5, 4.0):

        def integrand(delta, u=u):
            return math.exp(delta * u - delta * delta / 2) * stats.norm.pdf(delta, mu, sd) / mass

        value, _ = integrate.quad(integrand, 0.0, np.inf)
        assert _mixture.log_truncated_mixture(u, mu, rho) == pytest.approx(
            math.log(value), rel=1e-7, abs=1e-9
        )
        got = _mixture.log_truncated_mixture_array(np.array([u]), mu, rho)[0]
        assert got == pytest.approx(_mixture.log_truncated_mixture(u, mu, rho), rel=1e-12)


def test_truncated_mixture_at_zero_centre_is_the_half_normal():
    for ct in (0.05, 1.0, 20.0):
        for u in (-3.0, 0.0, 2.0, 8.0):
            assert _mixture.log_truncated_mixture(u, 0.0, 1.0 / ct) == pytest.approx(
                _mixture.log_mixture(u, ct, "one"), rel=1e-12, abs=1e-12
            )


def test_average_of_two_half_normals_is_the_two_sided_mixture():
    for u in (-4.0, -0.5, 0.0, 2.5):
        avg = _mixture.log_mean_exp(
            _mixture.log_mixture(u, 3.0, "one"), _mixture.log_mixture(-u, 3.0, "one")
        )
        assert avg == pytest.approx(_mixture.log_mixture(u, 3.0, "two"), rel=1e-12, abs=1e-12)
