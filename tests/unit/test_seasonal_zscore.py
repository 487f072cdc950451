import json
import math

import numpy as np
import pytest

from armguard.detectors import SeasonalZScore
from armguard.detectors._calibration import cusum_threshold, normal_isf

STEP = 300.0  # 5-minute intervals
DAY = 288


def seasonal_series(rng, days, phi=0.0, sd=2.0, df=None):
    """Daily (two harmonics) seasonal series with AR(1) noise of marginal sd ``sd``."""
    t = np.arange(days * DAY) * STEP
    e = rng.standard_normal(t.size) if df is None else rng.standard_t(df, t.size)
    r = np.empty_like(e)
    r[0] = e[0]
    for i in range(1, t.size):
        r[i] = phi * r[i - 1] + math.sqrt(1 - phi * phi) * e[i]
    season = 20 * np.sin(2 * np.pi * t / 86400) + 8 * np.sin(4 * np.pi * t / 86400 + 1)
    return t, 100 + season + sd * r


def feed(det, x, t):
    onsets = []
    for i, (xi, ti) in enumerate(zip(x.tolist(), t.tolist(), strict=True)):
        det.update(xi, ti)
        if det.alarm:
            onsets.append((i, det.kind))
    return onsets


def test_thresholds_come_from_the_run_length():
    det = SeasonalZScore(expected_run_length=10_000)
    assert det.threshold == pytest.approx(normal_isf(1 / 40_000))
    assert det.cusum_threshold == pytest.approx(cusum_threshold(40_000, 1.0))


def test_running_estimates_without_season_match_a_direct_computation():
    # season_bins=0, no clipping reached, no warmup alarms: level is an EWMA with rate
    # max(0.02, 1/n) and the variance an EW mean square of innovations.
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 1.0, 60)
    det = SeasonalZScore(season_bins=0, warmup_s=1e9, clip=20.0, scale_rate=0.05)
    level, var, c0, c1, phi, prev = x[0], 0.0, 0.0, 0.0, 0.0, 0.0
    for n, xi in enumerate(x.tolist(), start=1):
        det.update(xi, float(n))
        r = xi - level
        pred = phi * prev
        e = r - pred
        rate = max(0.05, 1 / n)
        var += rate * ((e * e if n <= 10 else min(e * e, 400 * var) / det._kappa) - var)
        c0 += rate * (r * r - c0)  # r_clean == r: nothing reaches the clip
        c1 += rate * (r * prev - c1)
        phi = min(0.95, max(0.0, c1 / c0)) if c0 > 0 else 0.0
        level += max(0.02, 1 / n) * r
        prev = r
        assert det._level == pytest.approx(level, rel=1e-12)
        assert det._var == pytest.approx(var, rel=1e-12)
        assert det._phi == pytest.approx(phi, rel=1e-12, abs=1e-15)


def test_exact_alarms_on_a_seeded_series():
    rng = np.random.default_rng(42)
    t = np.arange(4 * DAY) * STEP
    x = 100 + 20 * np.sin(2 * np.pi * t / 86400) + rng.normal(0, 2, t.size)
    x[700] += 30
    x[900:] += 6
    det = SeasonalZScore(expected_run_length=10_000, warmup_s=2 * 86400)
    assert feed(det, x, t) == [(700, "spike"), (903, "level_shift")]
    assert (det.n_spikes, det.n_level_shifts, det.n_alarms) == (1, 1, 2)


def test_spike_is_one_alarm_and_clears():
    rng = np.random.default_rng(2)
    t, x = seasonal_series(rng, 3)
    x[700] += 40
    x[701] += 40  # a two-interval burst is one incident
    det = SeasonalZScore(clear_after=2)
    levels = []
    for xi, ti in zip(x.tolist(), t.tolist(), strict=True):
        det.update(xi, ti)
        levels.append(det.in_alarm)
    assert det.n_alarms == 1
    assert levels[699:704] == [False, True, True, True, False]


@pytest.mark.slow
def test_injected_spikes_and_level_shift_found_with_few_false_flags():
    rng = np.random.default_rng(3)
    found_spikes = n_spikes = false_flags = n_clean = shifts_found = 0
    runs = 12
    for _ in range(runs):
        t, x = seasonal_series(rng, 9, phi=0.5)
        spikes = rng.choice(np.arange(3 * DAY, 6 * DAY), size=8, replace=False)
        x[spikes] += rng.choice([-1, 1], size=8) * 8 * 2.0  # 8 marginal sd
        x[7 * DAY :] += 4 * 2.0  # 4 sd level shift on day 8
        det = SeasonalZScore()
        flagged = []
        shift_at = None
        for i, (xi, ti) in enumerate(zip(x.tolist(), t.tolist(), strict=True)):
            det.update(xi, ti)
            if det.alarm:
                flagged.append(i)
            if shift_at is None and det.n_level_shifts and i >= 7 * DAY:
                shift_at = i
        spike_set = set(spikes.tolist())
        found_spikes += len(spike_set & set(flagged))
        n_spikes += len(spike_set)
        false_flags += len([i for i in flagged if i not in spike_set and i < 7 * DAY])
        n_clean += 7 * DAY - 2 * DAY
        shifts_found += shift_at is not None and shift_at - 7 * DAY < DAY // 4
    assert found_spikes / n_spikes >= 0.95
    assert shifts_found >= 0.9 * runs
    assert false_flags / n_clean * 1e4 <= 10


@pytest.mark.slow
@pytest.mark.parametrize("phi", [0.0, 0.5, 0.8])
def test_false_alarms_within_budget_on_seasonal_series(phi):
    rng = np.random.default_rng(4)
    alarms = n = 0
    for _ in range(8):
        t, x = seasonal_series(rng, 14, phi=phi)
        det = SeasonalZScore(expected_run_length=10_000)
        feed(det, x, t)
        alarms += det.n_alarms
        n += x.size
    assert alarms / n * 1e4 <= (2 if phi == 0 else 10)


@pytest.mark.slow
def test_heavy_tailed_noise_raises_the_spike_threshold_not_the_alarm_rate():
    rng = np.random.default_rng(6)
    alarms = n = 0
    for _ in range(8):
        t, x = seasonal_series(rng, 14, df=3)
        det = SeasonalZScore(expected_run_length=10_000)
        feed(det, x, t)
        alarms += det.n_alarms
        n += x.size
        assert det.threshold > 2 * normal_isf(1 / 40_000)  # learned a Pareto tail
    assert alarms / n * 1e4 <= 10
    # Normal noise keeps the normal quantile.
    t, x = seasonal_series(rng, 6)
    det = SeasonalZScore()
    feed(det, x, t)
    assert det.threshold == normal_isf(1 / 40_000)


def test_min_scale_keeps_sparse_counts_quiet():
    rng = np.random.default_rng(7)
    t = np.arange(6 * DAY) * STEP
    x = rng.poisson(0.05, t.size).astype(float)
    x[5 * DAY] = 6.0  # six errors in one interval is an anomaly even so
    det = SeasonalZScore(min_scale=1.0)
    assert feed(det, x, t) == [(5 * DAY, "spike")]


def test_state_round_trip_is_exact():
    rng = np.random.default_rng(5)
    t, x = seasonal_series(rng, 4, phi=0.3)
    x[900] += 50
    a = SeasonalZScore(warmup_s=86400)
    feed(a, x[:800], t[:800])
    b = SeasonalZScore.from_state(json.loads(json.dumps(a.to_state(), allow_nan=False)))
    assert b.to_state() == a.to_state()
    for xi, ti in zip(x[800:].tolist(), t[800:].tolist(), strict=True):
        a.update(xi, ti)
        b.update(xi, ti)
        assert a.to_dict() == b.to_dict()
    assert a.to_state() == b.to_state()


@pytest.mark.parametrize(
    "kw",
    [
        {"expected_run_length": 0.5},
        {"period_s": 0},
        {"season_bins": 1},
        {"season_bins": -2},
        {"level_rate": 0},
        {"season_rate": 1.5},
        {"scale_rate": "fast"},
        {"shift": -1},
        {"clip": 0.5},
        {"warmup_s": -1},
        {"clear_after": 0},
        {"min_scale": -1},
    ],
)
def test_invalid_params_are_named(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SeasonalZScore(**kw)


def test_non_finite_input_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        SeasonalZScore().update(1.0, float("nan"))
