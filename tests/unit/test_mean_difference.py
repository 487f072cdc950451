"""MeanDifferenceTest: scipy at one look, A/A error under continuous monitoring, power, state."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from armguard.detectors import MeanDifferenceTest, Summary, _mixture, split_alpha

from . import sequential_paths as sp


def _welch(x, y):
    res = stats.ttest_ind(y, x, equal_var=False)
    diff = y.mean() - x.mean()
    return diff, diff / res.statistic


# -- one look against scipy ----------------------------------------------------------------------


@pytest.mark.parametrize("harmful", ["increase", "decrease", "any"])
def test_one_look_matches_scipy_normal_theory(harmful):
    rng = np.random.default_rng(0)
    x, y = rng.normal(10.0, 2.0, 800), rng.normal(10.3, 3.0, 1200)
    test = MeanDifferenceTest(alpha=0.05, harmful=harmful, tuning_n=1000)
    r = test.update(Summary.from_values(x), Summary.from_values(y))
    diff, se = _welch(x, y)
    assert r.estimate == pytest.approx(diff, rel=1e-12)
    assert r.relative_estimate == pytest.approx(y.mean() / x.mean() - 1, rel=1e-12)
    sided = "two" if harmful == "any" else "one"
    ct = _mixture.tuning_constant(0.05, sided) * (2 / (1 / 800 + 1 / 1200)) / 1000
    b = _mixture.boundary(ct, -math.log(0.05), sided)
    lo, hi = r.confidence_interval
    assert (diff - lo) / se == pytest.approx(b, rel=1e-9)
    assert (hi - diff) / se == pytest.approx(b, rel=1e-9)
    # e-value: the mixture at Welch's z (harm direction positive)
    z = {"increase": diff / se, "decrease": -diff / se, "any": diff / se}[harmful]
    assert math.log(r.e_value) == pytest.approx(_mixture.log_mixture(z, ct, sided), rel=1e-9)
    # the confidence sequence contains the fixed-sample interval (and so its estimate)
    q = stats.norm.ppf(0.95 if sided == "one" else 0.975)
    assert lo < diff - q * se and diff + q * se < hi
    assert r.p_value == pytest.approx(min(1.0, 1.0 / r.e_value))


def test_confidence_sequence_contains_estimate_and_fixed_interval_at_every_look():
    rng = np.random.default_rng(1)
    test = MeanDifferenceTest(alpha=0.05, harmful="any")
    c, t = Summary(), Summary()
    xs, ys = [], []
    for _ in range(30):
        x, y = rng.lognormal(0, 1, 50), rng.lognormal(0.05, 1, 70)
        xs.append(x)
        ys.append(y)
        c.update_many(x)
        t.update_many(y)
        r = test.update(c, t)
        diff, se = _welch(np.concatenate(xs), np.concatenate(ys))
        q = stats.norm.ppf(0.975)
        lo, hi = r.confidence_interval
        assert lo < diff - q * se < diff < diff + q * se < hi
        if r.relative_interval is not None:  # None while control's mean is not clear of 0
            rlo, rhi = r.relative_interval
            assert rlo < r.relative_estimate < rhi
    assert r.relative_interval is not None


def test_relative_interval_inverts_the_relative_margin_test():
    # The relative interval's lower end is exactly the relative margin at which the
    # one-sided test would be at its threshold.
    rng = np.random.default_rng(2)
    c = Summary.from_values(rng.normal(100, 20, 5000))
    t = Summary.from_values(rng.normal(104, 20, 5000))
    lo = MeanDifferenceTest(alpha=0.05).update(c, t).relative_interval[0]
    for m, expect in ((lo - 1e-6, True), (lo + 1e-6, False)):
        test = MeanDifferenceTest(alpha=0.05, margin=m, relative_margin=True)
        assert test.update(c, t).breached is expect


# -- A/A: probability of ever breaching at most alpha ----------------------------------------------

P, LOOKS, BATCH = 4000, 150, 40  # 6,000 values per arm and 150 looks per path


@pytest.mark.parametrize(
    ("harmful", "tuning_n"),
    [("increase", 1000), ("increase", 20000), ("decrease", 200), ("any", 6000)],
)
def test_aa_gaussian_false_positive_rate_at_most_alpha(harmful, tuning_n):
    rng = np.random.default_rng(10)
    test = MeanDifferenceTest(alpha=0.05, harmful=harmful, tuning_n=tuning_n)
    c = sp.gaussian(rng, P, LOOKS, BATCH, 5.0, 2.0)
    t = sp.gaussian(rng, P, LOOKS, BATCH, 5.0, 2.0)
    hits = sp.first_crossing(test._log_e_paths(c, t), 0.05) >= 0
    assert sp.rate_minus_error(hits) <= 0.05
    assert hits.mean() > 0.005  # the simulation can see errors at all


@pytest.mark.parametrize(
    ("harmful", "margin", "relative", "effect"),
    [
        ("increase", 0.5, False, 0.5),  # true effect exactly at the margin: worst case
        ("decrease", 0.5, False, -0.5),
        ("increase", 0.1, True, 0.1),
        ("any", 0.5, False, 0.5),
        ("any", 0.5, False, -0.5),
    ],
)
def test_aa_at_the_margin_false_positive_rate_at_most_alpha(harmful, margin, relative, effect):
    rng = np.random.default_rng(11)
    test = MeanDifferenceTest(
        alpha=0.05, harmful=harmful, margin=margin, relative_margin=relative, tuning_n=2000
    )
    mean_t = 5.0 * (1 + effect) if relative else 5.0 + effect
    c = sp.gaussian(rng, P, LOOKS, BATCH, 5.0, 2.0)
    t = sp.gaussian(rng, P, LOOKS, BATCH, mean_t, 2.0)
    hits = sp.first_crossing(test._log_e_paths(c, t), 0.05) >= 0
    assert sp.rate_minus_error(hits) <= 0.05


@pytest.mark.parametrize(
    ("harmful", "margin", "relative", "true_effect", "effect"),
    [
        ("increase", 0.0, False, 0.0, 0.2),
        ("increase", 0.5, False, 0.5, 0.05),  # at the margin, a small stated effect
        ("decrease", 0.5, False, -0.5, 1.0),
        ("increase", 0.1, True, 0.1, 0.02),
        ("any", 0.0, False, 0.0, 0.2),
        ("any", 0.5, False, -0.5, 0.2),
    ],
)
def test_aa_effect_centred_mixture_false_positive_rate_at_most_alpha(
    harmful, margin, relative, true_effect, effect
):
    rng = np.random.default_rng(15)
    test = MeanDifferenceTest(
        alpha=0.05, harmful=harmful, margin=margin, relative_margin=relative, effect=effect
    )
    mean_t = 5.0 * (1 + true_effect) if relative else 5.0 + true_effect
    c = sp.gaussian(rng, P, LOOKS, BATCH, 5.0, 2.0)
    t = sp.gaussian(rng, P, LOOKS, BATCH, mean_t, 2.0)
    hits = sp.first_crossing(test._log_e_paths(c, t), 0.05) >= 0
    assert sp.rate_minus_error(hits) <= 0.05


def test_effect_centred_mixture_detects_sooner_than_the_tuned_half_normal():
    rng = np.random.default_rng(16)
    c = sp.gaussian(rng, 1000, 600, 25, 100.0, 30.0)
    t = sp.gaussian(rng, 1000, 600, 25, 102.0, 30.6)
    tuned = MeanDifferenceTest(tuning_n=MeanDifferenceTest.tuning_n_for(effect=2.0, sd=30.3))
    centred = MeanDifferenceTest(effect=2.0)
    d_tuned = sp.first_crossing(tuned._log_e_paths(c, t), 0.05)
    d_centred = sp.first_crossing(centred._log_e_paths(c, t), 0.05)
    assert (d_centred >= 0).mean() > 0.97 and (d_tuned >= 0).mean() > 0.97
    assert np.median(d_centred[d_centred >= 0]) < 0.95 * np.median(d_tuned[d_tuned >= 0])
    assert np.median(d_centred[d_centred >= 0] + 1) * 25 < 3000  # the reference


def test_effect_centred_class_matches_paths_and_interval_inverts_the_test():
    rng = np.random.default_rng(17)
    for harmful in ("increase", "any"):
        test = MeanDifferenceTest(harmful=harmful, effect=1.0, margin=0.5)
        c, t = Summary(), Summary()
        rows = []
        for _ in range(25):
            c.update_many(rng.normal(10.0, 4.0, 40))
            t.update_many(rng.normal(11.5, 4.0, 40))
            r = test.update(c, t)
            rows.append((c.count, c.sum, c.m2, t.count, t.sum, t.m2, math.log(r.e_value)))
        a = np.array(rows)
        log_e = test._log_e_paths((a[:, 0], a[:, 1], a[:, 2]), (a[:, 3], a[:, 4], a[:, 5]))
        np.testing.assert_allclose(log_e, a[:, 6], rtol=1e-9, atol=1e-12)
        # the lower end of this look's CS is the margin at which this look's evidence is 1/alpha
        lo = r.confidence_interval[0]
        at_lo = MeanDifferenceTest(harmful="increase", effect=1.0, margin=lo)
        if harmful == "increase":
            assert math.log(at_lo.update(c, t).e_value) == pytest.approx(-math.log(0.05))


def test_aa_lognormal_false_positive_rate_at_most_alpha():
    rng = np.random.default_rng(12)
    test = MeanDifferenceTest(alpha=0.05, harmful="any", tuning_n=500)
    c = sp.lognormal(rng, 2000, 100, 30, 0.0, 1.2)
    t = sp.lognormal(rng, 2000, 100, 30, 0.0, 1.2)
    eligible = c[0] >= 100  # min_samples=100: the CLT needs a few dozen skewed values
    hits = sp.first_crossing(test._log_e_paths(c, t), 0.05, eligible) >= 0
    assert sp.rate_minus_error(hits) <= 0.05


def test_aa_with_unbalanced_arms_and_looks_of_varying_size():
    rng = np.random.default_rng(13)
    paths, looks = 3000, 100
    sizes = rng.integers(5, 80, size=looks)
    sums_c = np.stack([rng.normal(0, np.sqrt(n), paths) for n in sizes], axis=1)
    sums_t = np.stack([rng.normal(0, np.sqrt(3 * n) * 1.5, paths) for n in sizes], axis=1)
    m2_c = np.stack([rng.chisquare(n - 1, paths) for n in sizes], axis=1)
    m2_t = np.stack([2.25 * rng.chisquare(3 * n - 1, paths) for n in sizes], axis=1)
    n_c = np.broadcast_to(np.cumsum(sizes).astype(float), (paths, looks))
    n_t = 3 * n_c
    ss_c = np.cumsum(m2_c + sums_c**2 / sizes, axis=1)
    ss_t = np.cumsum(m2_t + sums_t**2 / (3 * sizes), axis=1)
    s_c, s_t = np.cumsum(sums_c, axis=1), np.cumsum(sums_t, axis=1)
    c = (n_c, s_c, ss_c - s_c**2 / n_c)
    t = (n_t, s_t, ss_t - s_t**2 / n_t)
    test = MeanDifferenceTest(alpha=0.05, harmful="any", tuning_n=1000)
    hits = sp.first_crossing(test._log_e_paths(c, t), 0.05) >= 0
    assert sp.rate_minus_error(hits) <= 0.05


def test_bonferroni_family_error_at_most_family_alpha():
    # 3 treatments x 2 guardrails, every arm healthy: the chance that any of the 6 tests ever
    # breaches stays below the family alpha.
    rng = np.random.default_rng(14)
    split = split_alpha(0.1, treatments=3, guardrails=2)
    test = MeanDifferenceTest(alpha=split, harmful="any", tuning_n=2000)
    paths, looks, batch = 2000, 80, 50
    any_hit = np.zeros(paths, dtype=bool)
    for _guardrail in range(2):
        c = sp.gaussian(rng, paths, looks, batch, 0.0, 1.0)
        for _arm in range(3):
            t = sp.gaussian(rng, paths, looks, batch, 0.0, 1.0)
            any_hit |= sp.first_crossing(test._log_e_paths(c, t), split.alpha) >= 0
    assert sp.rate_minus_error(any_hit) <= 0.1


# -- power ---------------------------------------------------------------------------------------


def test_detects_a_latency_regression_and_not_the_opposite_direction():
    rng = np.random.default_rng(20)
    test = MeanDifferenceTest(alpha=0.05, harmful="increase", tuning_n=2000)
    c = sp.gaussian(rng, 1000, 200, 50, 100.0, 30.0)
    worse = sp.gaussian(rng, 1000, 200, 50, 102.0, 30.0 * 1.02)
    better = sp.gaussian(rng, 1000, 200, 50, 95.0, 30.0)
    first = sp.first_crossing(test._log_e_paths(c, worse), 0.05)
    assert (first >= 0).mean() > 0.95
    assert np.median(first[first >= 0] + 1) * 50 < 4000  # samples per arm, cf. bench
    assert (sp.first_crossing(test._log_e_paths(c, better), 0.05) >= 0).mean() == 0.0
    two = MeanDifferenceTest(alpha=0.05, harmful="any", tuning_n=2000)
    assert (sp.first_crossing(two._log_e_paths(c, better), 0.05) >= 0).mean() > 0.95


# -- the class on a few paths agrees with the vectorised statistics ------------------------------


def test_class_matches_vectorised_paths_and_alarm_positions():
    rng = np.random.default_rng(30)
    test = MeanDifferenceTest(alpha=0.05, harmful="increase", tuning_n=3000, min_samples=200)
    for _path in range(3):
        c, t = Summary(), Summary()
        rows = []
        breach_look = None
        p_prev = 1.0
        for look in range(60):
            x = rng.normal(50.0, 10.0, 100)
            y = rng.normal(51.0, 10.0, 100)
            c.update_many(x)
            t.update_many(y)
            r = test_r = test.update(c, t)
            rows.append((c.count, c.sum, c.m2, t.count, t.sum, t.m2, r))
            assert r.p_value <= p_prev
            p_prev = r.p_value
            if r.breached and breach_look is None:
                breach_look = look
            assert r.min_samples_reached is (look >= 1)
            if look < 1:
                assert not r.breached
        arr = np.array([row[:6] for row in rows])
        log_e = test._log_e_paths(
            (arr[:, 0], arr[:, 1], arr[:, 2]), (arr[:, 3], arr[:, 4], arr[:, 5])
        )
        np.testing.assert_allclose(log_e, [math.log(row[6].e_value) for row in rows], rtol=1e-9)
        first = sp.first_crossing(log_e[None, :], 0.05, (arr[:, 0] >= 200)[None, :])[0]
        assert (breach_look if breach_look is not None else -1) == first
        assert test_r.breached is bool(first >= 0)
        test = MeanDifferenceTest(alpha=0.05, harmful="increase", tuning_n=3000, min_samples=200)


def test_exact_alarm_position_on_a_seeded_stream():
    rng = np.random.default_rng(42)
    test = MeanDifferenceTest(alpha=0.01, harmful="increase", tuning_n=2000)
    c, t = Summary(), Summary()
    looks = []
    for look in range(200):
        c.update_many(rng.normal(100.0, 30.0, 100))
        t.update_many(rng.normal(104.0 if look >= 10 else 100.0, 30.0, 100))
        if test.update(c, t).breached:
            looks.append(look)
    assert looks[0] == 24
    assert looks == list(range(24, 200))  # sticky
    assert test.breached and test.p_value <= 0.01


def test_min_samples_gates_breach_and_early_looks_do_not_count():
    c = Summary.from_values(np.array([1.0, 1.1, 0.9, 1.0]))
    t = Summary.from_values(np.array([5.0, 5.1, 4.9, 5.0]))
    gated = MeanDifferenceTest(alpha=0.05, tuning_n=4, min_samples=10)
    r = gated.update(c, t)
    assert not r.breached and not r.min_samples_reached and r.p_value == 1.0
    assert r.e_value > 1e6  # the evidence is there but inconclusive by policy
    free = MeanDifferenceTest(alpha=0.05, tuning_n=4)
    assert free.update(c, t).breached


def test_degenerate_inputs():
    test = MeanDifferenceTest()
    r = test.update(Summary(), Summary())
    assert r.estimate is None and r.confidence_interval is None and not r.breached
    assert r.p_value == 1.0 and r.e_value == 1.0
    one = Summary.from_values(np.array([3.0]))
    r = test.update(one, one)
    assert r.estimate == 0.0 and r.confidence_interval is None
    # constant arms: zero variance, a difference is certain
    c = Summary.from_values(np.full(50, 2.0))
    t = Summary.from_values(np.full(50, 3.0))
    r = MeanDifferenceTest().update(c, t)
    assert r.breached and r.p_value == pytest.approx(math.exp(-_mixture.LOG_E_CAP))
    assert orjson.loads(orjson.dumps(r.to_dict()))["breached"] is True
    r = MeanDifferenceTest().update(c, c)
    assert not r.breached


def test_summaries_must_be_cumulative():
    test = MeanDifferenceTest()
    big = Summary.from_values(np.arange(10.0))
    test.update(big, big)
    with pytest.raises(ValueError, match="cumulative"):
        test.update(Summary.from_values(np.arange(5.0)), big)


def test_state_round_trip_mid_stream_is_exact():
    rng = np.random.default_rng(5)
    split = split_alpha(0.05, treatments=2, guardrails=3)
    a = MeanDifferenceTest(alpha=split, harmful="any", margin=0.5, tuning_n=500)
    c, t = Summary(), Summary()
    for _ in range(5):
        c.update_many(rng.normal(0, 1, 30))
        t.update_many(rng.normal(0.2, 1, 30))
        a.update(c, t)
    b = MeanDifferenceTest.from_state(orjson.loads(orjson.dumps(a.to_state())))
    assert b.to_state() == a.to_state() and b.result == a.result
    for _ in range(5):
        c.update_many(rng.normal(0, 1, 30))
        t.update_many(rng.normal(0.2, 1, 30))
        assert a.update(c, t) == b.update(c, t)
    assert a.to_state() == b.to_state()
    assert a.result.alpha_split == split.to_dict() and a.result.alpha == pytest.approx(0.05 / 6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"harmful": "up"}, "increase"),
        ({"margin": -1.0}, "margin"),
        ({"margin": 1.0, "relative_margin": True}, r"\[0, 1\)"),
        ({"relative_margin": "yes"}, "relative_margin"),
        ({"tuning_n": 0}, "tuning_n"),
        ({"min_samples": -1}, "min_samples"),
    ],
)
def test_invalid_parameters_name_the_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeanDifferenceTest(**kwargs)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    looks=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=12),
    harmful=st.sampled_from(["increase", "decrease", "any"]),
    margin=st.sampled_from([0.0, 0.3]),
    effect=st.sampled_from([None, 0.5]),
    shift=st.floats(-1.0, 1.0),
)
def test_invariants_on_arbitrary_look_sequences(seed, looks, harmful, margin, effect, shift):
    rng = np.random.default_rng(seed)
    test = MeanDifferenceTest(
        alpha=0.05, harmful=harmful, margin=margin, effect=effect, tuning_n=100, min_samples=5
    )
    c, t = Summary(), Summary()
    p_prev, was_breached = 1.0, False
    for n_c, n_t in looks:
        c.update_many(rng.normal(0.0, 1.0, n_c))
        t.update_many(rng.normal(shift, 1.0, n_t))
        r = test.update(c, t)
        assert 0.0 < r.p_value <= p_prev
        p_prev = r.p_value
        assert r.breached == (r.min_samples_reached and r.p_value <= 0.05)
        assert r.breached or not was_breached  # sticky
        was_breached = r.breached
        if r.confidence_interval is not None:
            lo, hi = r.confidence_interval
            assert lo <= r.estimate <= hi
        _ = orjson.dumps(r.to_dict())
