import json
import math

import numpy as np
import pytest
from scipy import stats

from armguard.detectors import CalibrationDrift
from armguard.detectors.calibration_drift import bin_predictions


def test_bin_predictions_matches_numpy():
    rng = np.random.default_rng(1)
    p = np.r_[rng.random(500), 1.0, 0.0]
    y = rng.random(p.size) < p
    counts, psum, ysum = bin_predictions(p, y, n_bins=5)
    idx = np.minimum(np.floor(p * 5), 4).astype(int)
    for b in range(5):
        assert counts[b] == np.sum(idx == b)
        assert psum[b] == pytest.approx(p[idx == b].sum())
        assert ysum[b] == np.sum(y[idx == b])
    with pytest.raises(ValueError, match="0 or 1"):
        bin_predictions([0.5], [2])


def test_statistics_match_direct_computation():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.1, 0.9, 3000)
    y = rng.random(p.size) < np.clip(p + 0.02, 0, 1)
    det = CalibrationDrift(window_intervals=2)
    half = p.size // 2
    det.update(*bin_predictions(p[:half], y[:half]))
    det.update(*bin_predictions(p[half:], y[half:]))
    n, e, o = (np.asarray(v, dtype=float) for v in bin_predictions(p, y))
    assert det.bias == pytest.approx(p.mean() - y.mean(), abs=1e-12)
    assert det.ece == pytest.approx(np.sum(np.abs(e - o)) / n.sum(), rel=1e-12)
    nz = n > 0  # bins 0 and 9 are empty
    n, e, o = n[nz], e[nz], o[nz]
    v = e * (1 - e / n)
    hl = np.sum((o - e) ** 2 / v)
    z = (o.sum() - e.sum()) / math.sqrt(v.sum())
    expect = min(1.0, 2 * min(stats.chi2.sf(hl, nz.sum()), 2 * stats.norm.sf(abs(z))))
    assert det.p_value == pytest.approx(expect, rel=1e-9)
    assert det.count == p.size


@pytest.mark.slow
def test_false_alarms_for_a_calibrated_model_and_detection_of_a_bias():
    rng = np.random.default_rng(3)
    det = CalibrationDrift(expected_run_length=1000, window_intervals=1)
    # 20,000 evaluations of 300 calibrated predictions each, binned vectorised per interval.
    evaluations = 20_000
    p = rng.beta(2, 5, size=(evaluations, 300))
    y = rng.random(p.shape) < p
    idx = np.minimum((p * 10).astype(int), 9)
    for i in range(evaluations):
        b = idx[i]
        det.update(
            np.bincount(b, minlength=10),
            np.bincount(b, weights=p[i], minlength=10),
            np.bincount(b, weights=y[i], minlength=10),
        )
    assert det.n_alarms / evaluations <= 2 / 1000
    det = CalibrationDrift(expected_run_length=10_000, window_intervals=6)
    onset = None
    for i in range(40):
        p = rng.beta(2, 5, 1000)
        truth = p if i < 20 else p * 0.8  # over-predicts by 20% from interval 20
        det.update(*bin_predictions(p, rng.random(p.size) < truth))
        if det.alarm:
            onset = i
            break
    assert onset is not None and 20 <= onset <= 23
    assert det.bias > 0


def test_edge_and_clear():
    rng = np.random.default_rng(4)
    det = CalibrationDrift(window_intervals=1)
    levels = []
    for i in range(9):
        p = rng.uniform(0.2, 0.8, 2000)
        truth = p if not 3 <= i < 6 else p - 0.15
        det.update(*bin_predictions(p, rng.random(p.size) < truth))
        levels.append(det.in_alarm)
    assert levels == [False] * 3 + [True] * 3 + [False] * 3
    assert det.n_alarms == 1


def test_state_round_trip_is_exact():
    rng = np.random.default_rng(5)
    a = CalibrationDrift(window_intervals=3)
    batches = [bin_predictions(p, rng.random(p.size) < p) for p in rng.random((8, 200))]
    for b in batches[:5]:
        a.update(*b)
    twin = CalibrationDrift.from_state(json.loads(json.dumps(a.to_state(), allow_nan=False)))
    assert twin.to_state() == a.to_state()
    for b in batches[5:]:
        a.update(*b)
        twin.update(*b)
        assert a.to_dict() == twin.to_dict()


@pytest.mark.parametrize(
    "kw",
    [{"expected_run_length": 0}, {"n_bins": 0}, {"window_intervals": 0}, {"clear_fraction": -1}],
)
def test_invalid_params_are_named(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        CalibrationDrift(**kw)


def test_invalid_input_is_named():
    det = CalibrationDrift(n_bins=2)
    with pytest.raises(ValueError, match="n_bins=2"):
        det.update([1], [0.5], [1])
    with pytest.raises(ValueError, match="exceed"):
        det.update([1, 1], [0.5, 0.5], [2, 0])


def test_chi2_sf_matches_scipy():
    # chi2_sf takes a closed form for integer degrees of freedom and the incomplete gamma
    # function otherwise; both agree with scipy to ~1e-13 over the range the detectors use.
    from armguard.detectors._calibration import chi2_sf

    for df in [1, 2, 3, 4, 7, 10, 19, 50, 199, 200, 201, 2.5]:
        for x in np.geomspace(1e-6, 1200, 60):
            expect = stats.chi2.sf(x, df)
            if expect > 1e-280:
                assert chi2_sf(x, df) == pytest.approx(expect, rel=1e-12), (df, x)
    assert chi2_sf(0.0, 3) == 1.0
