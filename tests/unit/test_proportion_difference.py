"""ProportionDifferenceTest: one look against scipy, A/A error incl. rare events, power, state."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from scipy import stats

from armguard.detectors import ProportionDifferenceTest, Summary, _mixture

from . import sequential_paths as sp


def _binary(n: int, successes: int) -> Summary:
    s = Summary()
    s.update_many(np.r_[np.ones(successes), np.zeros(n - successes)])
    return s


def test_one_look_matches_the_normal_theory_formula_and_scipy():
    c, t = _binary(20_000, 210), _binary(18_000, 250)
    r = ProportionDifferenceTest(alpha=0.05, harmful="increase", tuning_n=10_000).update(c, t)
    p_c, p_t = 210 / 20_000, 250 / 18_000
    assert r.estimate == pytest.approx(p_t - p_c, rel=1e-12)
    q_c, q_t = 211 / 20_002, 251 / 18_002  # Agresti-Caffo adjusted, variance only
    se = math.sqrt(q_t * (1 - q_t) / 18_000 + q_c * (1 - q_c) / 20_000)
    ct = _mixture.tuning_constant(0.05, "one") * (2 / (1 / 18_000 + 1 / 20_000)) / 10_000
    assert math.log(r.e_value) == pytest.approx(
        _mixture.log_mixture((p_t - p_c) / se, ct, "one"), rel=1e-9
    )
    # with this many units the adjustment is negligible: Welch's z on the 0/1 data agrees
    x = np.r_[np.ones(210), np.zeros(20_000 - 210)]
    y = np.r_[np.ones(250), np.zeros(18_000 - 250)]
    welch = stats.ttest_ind(y, x, equal_var=False).statistic
    assert (p_t - p_c) / se == pytest.approx(welch, rel=5e-3)
    lo, hi = r.confidence_interval
    assert lo < (p_t - p_c) - stats.norm.ppf(0.95) * se and hi > p_t - p_c
    assert r.relative_estimate == pytest.approx(p_t / p_c - 1)


def test_no_event_yet_gives_finite_evidence():
    r = ProportionDifferenceTest(alpha=0.05).update(_binary(300, 0), _binary(300, 2))
    assert math.isfinite(r.e_value) and r.e_value < 5 and not r.breached


# -- A/A under continuous monitoring -------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "batch", "harmful", "tuning_n", "effect"),
    [
        (0.001, 1000, "increase", 10_000, None),  # rare: ~1 error per look per arm
        (0.001, 1000, "increase", 500, None),  # rare and tuned early (the hard case)
        (0.001, 1000, "any", 10_000, None),
        (0.001, 1000, "increase", 10_000, 0.0005),  # rare, mixture centred on +0.05 pp
        (0.001, 1000, "increase", 10_000, 0.01),  # rare, centred on a large effect
        (0.01, 200, "increase", 2000, None),
        (0.01, 200, "any", 2000, 0.003),
        (0.1, 100, "decrease", 5000, None),
        (0.1, 100, "decrease", 5000, 0.01),
        (0.5, 20, "any", 100, None),
    ],
)
def test_aa_binary_false_positive_rate_at_most_alpha(p, batch, harmful, tuning_n, effect):
    rng = np.random.default_rng(int(p * 1e4) + batch + tuning_n)
    test = ProportionDifferenceTest(alpha=0.05, harmful=harmful, tuning_n=tuning_n, effect=effect)
    c = sp.binary(rng, 4000, 200, batch, p)
    t = sp.binary(rng, 4000, 200, batch, p)
    hits = sp.first_crossing(test._log_e_paths(c, t), 0.05) >= 0
    assert sp.rate_minus_error(hits) <= 0.05


def test_aa_rare_events_at_alpha_001():
    rng = np.random.default_rng(7)
    test = ProportionDifferenceTest(alpha=0.01, harmful="increase", tuning_n=20_000)
    c = sp.binary(rng, 10_000, 100, 2000, 0.001)
    t = sp.binary(rng, 10_000, 100, 2000, 0.001)
    hits = sp.first_crossing(test._log_e_paths(c, t), 0.01) >= 0
    assert sp.rate_minus_error(hits) <= 0.01


def test_aa_relative_margin_at_the_boundary():
    rng = np.random.default_rng(8)
    test = ProportionDifferenceTest(alpha=0.05, margin=0.2, relative_margin=True, tuning_n=5000)
    c = sp.binary(rng, 4000, 150, 200, 0.05)
    t = sp.binary(rng, 4000, 150, 200, 0.06)  # exactly +20%: not harmful beyond the margin
    hits = sp.first_crossing(test._log_e_paths(c, t), 0.05) >= 0
    assert sp.rate_minus_error(hits) <= 0.05


# -- power ---------------------------------------------------------------------------------------


def test_detects_error_rate_regression_and_conversion_drop():
    rng = np.random.default_rng(9)
    errors = ProportionDifferenceTest(alpha=0.05, harmful="increase", tuning_n=10_000)
    c = sp.binary(rng, 1000, 200, 500, 0.010)
    t = sp.binary(rng, 1000, 200, 500, 0.013)
    first = sp.first_crossing(errors._log_e_paths(c, t), 0.05)
    assert (first >= 0).mean() > 0.95
    assert np.median((first[first >= 0] + 1) * 500) < 17_500  # the reference delay
    conversions = ProportionDifferenceTest(alpha=0.05, harmful="decrease", tuning_n=7000)
    c = sp.binary(rng, 1000, 100, 500, 0.10)
    t = sp.binary(rng, 1000, 100, 500, 0.09)
    first = sp.first_crossing(conversions._log_e_paths(c, t), 0.05)
    assert (first >= 0).mean() > 0.95
    assert np.median((first[first >= 0] + 1) * 500) < 11_600


def test_class_matches_vectorised_paths():
    rng = np.random.default_rng(10)
    for p_t in (0.02, 0.03):
        test = ProportionDifferenceTest(alpha=0.05, harmful="any", margin=0.002, tuning_n=3000)
        c, t = Summary(), Summary()
        rows, breaches = [], []
        for _ in range(40):
            c.update_many((rng.random(250) < 0.02).astype(float))
            t.update_many((rng.random(250) < p_t).astype(float))
            r = test.update(c, t)
            rows.append((c.count, c.sum, c.m2, t.count, t.sum, t.m2, math.log(r.e_value)))
            breaches.append(r.breached)
        a = np.array(rows)
        log_e = test._log_e_paths((a[:, 0], a[:, 1], a[:, 2]), (a[:, 3], a[:, 4], a[:, 5]))
        np.testing.assert_allclose(log_e, a[:, 6], rtol=1e-9, atol=1e-12)
        first = sp.first_crossing(log_e[None, :], 0.05)[0]
        assert breaches == [first >= 0 and i >= first for i in range(40)]


def test_rejects_non_binary_summaries():
    with pytest.raises(ValueError, match="binary"):
        ProportionDifferenceTest().update(Summary.from_values(np.array([2.0, 3.0])), _binary(2, 1))


def test_state_round_trip():
    a = ProportionDifferenceTest(alpha=0.01, harmful="decrease", margin=0.1, relative_margin=True)
    a.update(_binary(1000, 100), _binary(1000, 80))
    b = ProportionDifferenceTest.from_state(orjson.loads(orjson.dumps(a.to_state())))
    assert b.to_state() == a.to_state()
    assert a.update(_binary(2000, 200), _binary(2000, 150)) == b.update(
        _binary(2000, 200), _binary(2000, 150)
    )
