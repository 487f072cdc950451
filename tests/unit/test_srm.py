"""SampleRatioMismatch: Bayes factor against scipy and the Polya urn, A/A error, power, state."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from scipy import special

from armguard.detectors import SampleRatioMismatch, split_alpha

from . import sequential_paths as sp


def _scipy_log_bf(counts, theta, k):
    a = k * np.asarray(theta)
    x = np.asarray(counts, dtype=float)
    log_b = lambda v: special.gammaln(v).sum() - special.gammaln(v.sum())  # noqa: E731
    return log_b(a + x) - log_b(a) - (x * np.log(theta)).sum()


def test_bayes_factor_matches_scipy_and_the_sequential_polya_urn():
    theta = np.array([0.2, 0.3, 0.5])
    srm = SampleRatioMismatch(allocation={"a": 0.2, "b": 0.3, "c": 0.5}, concentration=7.0)
    rng = np.random.default_rng(0)
    arms = rng.choice(3, size=60, p=[0.3, 0.3, 0.4])
    counts = np.zeros(3, dtype=int)
    log_urn = 0.0  # product of posterior-predictive / null probabilities, one unit at a time
    for arm in arms:
        a = 7.0 * theta + counts
        log_urn += math.log(a[arm] / a.sum()) - math.log(theta[arm])
        counts[arm] += 1
    r = srm.update(dict(zip("abc", counts.tolist(), strict=True)))
    assert math.log(r.e_value) == pytest.approx(log_urn, rel=1e-10)
    assert math.log(r.e_value) == pytest.approx(_scipy_log_bf(counts, theta, 7.0), rel=1e-10)
    np.testing.assert_allclose(srm._log_bf_paths(counts[None, :]), [log_urn], rtol=1e-10)


@pytest.mark.parametrize(
    ("allocation", "alpha", "tuning_n"),
    [
        ((0.5, 0.5), 0.001, 50_000),
        ((0.5, 0.5), 0.05, 1000),
        ((0.5, 0.5), 0.05, 100_000),
        ((0.1, 0.9), 0.05, 5000),
        ((0.2, 0.3, 0.5), 0.05, 20_000),
    ],
)
def test_aa_false_positive_rate_at_the_designed_ratio(allocation, alpha, tuning_n):
    rng = np.random.default_rng(len(allocation) + tuning_n)
    srm = SampleRatioMismatch(
        allocation={f"arm{i}": p for i, p in enumerate(allocation)}, alpha=alpha, tuning_n=tuning_n
    )
    paths = 20_000 if alpha < 0.01 else 4000
    counts = rng.multinomial(400, allocation, size=(paths, 100)).cumsum(axis=1)
    hits = sp.first_crossing(srm._log_bf_paths(counts), alpha) >= 0
    assert sp.rate_minus_error(hits) <= alpha


def test_detects_a_49_51_split():
    rng = np.random.default_rng(3)
    srm = SampleRatioMismatch(allocation={"control": 0.5, "treatment": 0.5})
    counts = rng.multinomial(2000, [0.49, 0.51], size=(500, 150)).cumsum(axis=1)
    first = sp.first_crossing(srm._log_bf_paths(counts), 0.001)
    assert (first >= 0).mean() > 0.9


def test_class_breach_matches_vectorised_first_crossing():
    rng = np.random.default_rng(4)
    srm = SampleRatioMismatch(allocation={"c": 0.5, "t1": 0.25, "t2": 0.25}, alpha=0.01)
    counts = rng.multinomial(1000, [0.5, 0.24, 0.26], size=120).cumsum(axis=0)
    breaches = [
        srm.update(dict(zip(("c", "t1", "t2"), row.tolist(), strict=True))).breached
        for row in counts
    ]
    first = sp.first_crossing(srm._log_bf_paths(counts)[None, :], 0.01)[0]
    assert first >= 0
    assert breaches == [i >= first for i in range(120)]
    r = srm.result
    assert r.most_deviating_arm in ("t1", "t2") and r.n == int(counts[-1].sum())
    assert sum(r.observed_shares.values()) == pytest.approx(1.0)


def test_exact_alarm_position_and_min_samples():
    rng = np.random.default_rng(42)
    x = rng.multinomial(500, [0.47, 0.53], size=400).cumsum(axis=0)
    srm = SampleRatioMismatch(allocation={"a": 0.5, "b": 0.5}, min_samples=50_000)
    looks = [
        i for i, row in enumerate(x) if srm.update({"a": int(row[0]), "b": int(row[1])}).breached
    ]
    assert looks[0] == 99 and looks[-1] == 399  # first look with >= 50,000 units
    free = SampleRatioMismatch(allocation={"a": 0.5, "b": 0.5})
    free_looks = [
        i for i, row in enumerate(x) if free.update({"a": int(row[0]), "b": int(row[1])}).breached
    ]
    assert free_looks[0] == 14


def test_missing_arms_count_zero_and_bad_counts_are_rejected():
    srm = SampleRatioMismatch(allocation={"a": 0.5, "b": 0.5})
    r = srm.update({"a": 10})
    assert r.counts == {"a": 10, "b": 0}
    with pytest.raises(ValueError, match="unknown arms"):
        srm.update({"zz": 1})
    with pytest.raises(ValueError, match="cumulative"):
        srm.update({"a": 5, "b": 0})
    with pytest.raises(ValueError, match="non-negative"):
        srm.update({"a": -1})
    empty = SampleRatioMismatch(allocation={"a": 0.5, "b": 0.5}).update({})
    assert empty.observed_shares is None and empty.p_value == 1.0 and not empty.breached


def test_state_round_trip_and_alpha_split():
    split = split_alpha(0.001, treatments=2)
    a = SampleRatioMismatch(allocation={"a": 0.5, "b": 0.5}, alpha=split, tuning_n=1000)
    a.update({"a": 480, "b": 560})
    b = SampleRatioMismatch.from_state(orjson.loads(orjson.dumps(a.to_state())))
    assert b.to_state() == a.to_state() and b.result == a.result
    assert a.update({"a": 900, "b": 1100}) == b.update({"a": 900, "b": 1100})
    assert a.result.alpha == 0.0005 and a.result.alpha_split["n_tests"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"allocation": {"a": 0.5, "b": 0.6}}, "sum"),
        ({"allocation": {"a": 1.0}}, "at least two"),
        ({"allocation": {"a": 0.5, "b": 0.5}, "alpha": 2}, "alpha"),
        ({"allocation": {"a": 0.5, "b": 0.5}, "concentration": -1}, "concentration"),
        ({"allocation": {"a": 0.5, "b": 0.5}, "tuning_n": 0}, "tuning_n"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleRatioMismatch(**kwargs)
