import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from armguard.detectors import RankCUSUM
from armguard.detectors._calibration import (
    KOLMOGOROV_MEAN,
    chi2_isf,
    chi2_sf,
    cusum_run_length,
    cusum_threshold,
    kolmogorov_isf,
    kolmogorov_sf,
)
from armguard.detectors.rank_cusum import _splitmix64


def run(det, xs):
    """Feed a stream; return the indices of alarm onsets."""
    onsets = []
    for i, x in enumerate(np.asarray(xs, dtype=float).tolist()):
        det.update(x)
        if det.alarm:
            onsets.append(i)
    return onsets


def ar1(rng, phi, shape):
    e = rng.standard_normal(shape)
    out = np.empty_like(e)
    out[..., 0] = e[..., 0] / math.sqrt(1 - phi * phi)
    for t in range(1, shape[-1]):
        out[..., t] = phi * out[..., t - 1] + e[..., t]
    return out


# -- calibration helpers against scipy -------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 5, 17, 60])
@pytest.mark.parametrize("alpha", [0.05, 1e-4, 1e-7])
def test_chi2_quantiles_match_scipy(df, alpha):
    assert chi2_isf(alpha, df) == pytest.approx(stats.chi2.isf(alpha, df), rel=1e-9)
    x = stats.chi2.isf(alpha, df)
    assert chi2_sf(x, df) == pytest.approx(alpha, rel=1e-8)


@pytest.mark.parametrize("x", [0.3, 0.8, 1.36, 2.0, 2.5])
def test_kolmogorov_matches_scipy(x):
    assert kolmogorov_sf(x) == pytest.approx(stats.kstwobign.sf(x), rel=1e-9, abs=1e-15)
    assert kolmogorov_isf(1e-4) == pytest.approx(stats.kstwobign.isf(1e-4), rel=1e-9)
    assert pytest.approx(stats.kstwobign.mean(), rel=1e-9) == KOLMOGOROV_MEAN


def test_cusum_threshold_inverts_siegmund():
    for arl in (100.0, 1e4, 1e6):
        for k in (0.25, 0.5, 1.0):
            h = cusum_threshold(arl, k)
            assert cusum_run_length(h, k) == pytest.approx(arl, rel=1e-9)
    # Textbook value: k = 0.5, h = 4 gives ARL0 ~ 336 by Siegmund (exact ~ 336).
    assert cusum_run_length(4.0, 0.5) == pytest.approx(336, rel=0.01)


# -- running values --------------------------------------------------------------------------


def test_sequential_ranks_and_scores_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=200)
    x[50:60] = x[40]  # ties
    det = RankCUSUM(components=("location",), warmup=10, reference_size=150, autocorrelation=False)
    up = down = 0.0
    rng_state = det.seed
    for t, xt in enumerate(x.tolist()):
        ref = x[: min(t, 150)]
        below, tied = (ref < xt).sum(), (ref == xt).sum()
        if tied:  # randomised rank inside the tied block
            rng_state, w = _splitmix64(rng_state)
            u = (below + (tied + 1) * w) / (len(ref) + 1)
        else:
            u = (below + 0.5) / (len(ref) + 1)
        s = math.sqrt(3) * (2 * u - 1)
        det.update(xt)
        if t + 1 > 10:
            up = max(0.0, up + s - 0.25)
            down = max(0.0, down - s - 0.25)
        assert det.score == pytest.approx(max(up, down), abs=1e-12)
        assert not det.alarm


def test_sequential_ranks_are_uniform_and_components_orthonormal():
    # Under no change the four scores have mean 0, variance ~1 and are uncorrelated.
    rng = np.random.default_rng(4)
    u = rng.random(200_000)
    v = 2 * u - 1
    comps = np.stack(
        [
            math.sqrt(3) * v,
            math.sqrt(5) * (1.5 * v**2 - 0.5),
            math.sqrt(7) * (2.5 * v**3 - 1.5 * v),
            3 * (35 * v**4 - 30 * v**2 + 3) / 8,
        ]
    )
    np.testing.assert_allclose(np.cov(comps), np.eye(4), atol=0.02)


# -- exact alarms on seeded streams ----------------------------------------------------------


def test_exact_alarm_positions():
    rng = np.random.default_rng(42)
    x = np.concatenate([rng.normal(0, 1, 300), rng.normal(1, 1, 100)])
    det = RankCUSUM(expected_run_length=10_000)
    assert run(det, x) == [321]
    assert det.component == "location+"

    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(0, 1, 400), rng.normal(0, math.sqrt(2), 400)])
    det = RankCUSUM(expected_run_length=10_000)
    assert run(det, x) == [465]
    assert det.component.startswith(("scale", "kurtosis"))


def test_alarm_is_an_edge_and_clears_after_relearning():
    rng = np.random.default_rng(42)
    x = np.concatenate([rng.normal(0, 1, 300), rng.normal(3, 1, 300)])
    det = RankCUSUM(warmup=20)
    levels = []
    onsets = []
    for i, xi in enumerate(x.tolist()):
        det.update(xi)
        levels.append(det.in_alarm)
        if det.alarm:
            onsets.append(i)
    assert len(onsets) == 1
    first = onsets[0]
    assert 300 <= first < 310
    # Level holds exactly while the restarted detector relearns (20 values), then clears.
    assert levels[first : first + 21] == [True] * 21
    assert not any(levels[first + 21 :])
    assert det.n_alarms == 1


# -- false-alarm budget and power (seeded simulations) ---------------------------------------


def false_alarms_per_10k(streams, **kw):
    alarms = n = 0
    for s in streams:
        det = RankCUSUM(expected_run_length=10_000, **kw)
        alarms += len(run(det, s))
        n += s.size
    return alarms / n * 1e4


@pytest.mark.slow
def test_false_alarms_within_budget_iid_ar1_heavy_tailed():
    rng = np.random.default_rng(11)
    shape = (40, 5000)
    assert false_alarms_per_10k(rng.standard_normal(shape)) <= 2
    assert false_alarms_per_10k(rng.standard_t(2, shape)) <= 2  # heavy tails
    assert false_alarms_per_10k(rng.lognormal(0, 1.5, shape)) <= 2  # skewed
    assert false_alarms_per_10k(ar1(rng, 0.5, shape)) <= 10
    assert false_alarms_per_10k(ar1(rng, 0.8, shape)) <= 10


def test_splitmix64_matches_the_reference_sequence():
    # First outputs of SplitMix64 from seed 0 (Vigna's reference implementation).
    state, outputs = 0, []
    for _ in range(3):
        state, w = _splitmix64(state)
        outputs.append(int(w * 2**53) << 11)
    assert [o >> 11 for o in outputs] == [
        0xE220A8397B1DCDAF >> 11,
        0x6E789E6AA1B965F4 >> 11,
        0x06C45D188009454F >> 11,
    ]


def test_tied_and_discrete_streams_stay_within_budget():
    det = RankCUSUM()
    run(det, np.ones(3000))
    assert det.n_alarms == 0
    rng = np.random.default_rng(13)
    for lam in (0.05, 0.3, 3.0):  # per-interval counts, mostly zeros for small lam
        assert false_alarms_per_10k(rng.poisson(lam, (10, 5000)).astype(float)) <= 2, lam
    # and a doubling of a small rate is still found
    found = 0
    for _ in range(20):
        det = RankCUSUM()
        run(det, rng.poisson(0.3, 500).astype(float))
        found += bool(run(det, rng.poisson(0.6, 1000).astype(float)))
    assert found >= 18


def delays(rng, post, n_pre=500):
    out = []
    for p in range(post.shape[0]):
        det = RankCUSUM(expected_run_length=10_000)
        run(det, rng.standard_normal(n_pre))
        before = det.n_alarms
        hits = run(det, post[p])
        if det.n_alarms > before and hits:
            out.append(hits[0] + 1)
    return np.array(out)


@pytest.mark.slow
def test_changes_are_detected():
    rng = np.random.default_rng(12)
    runs, n_post = 60, 1000
    z = rng.standard_normal((runs, n_post))
    a = 0.9  # bimodal mixture with mean 0 and variance 1, like N(0, 1)
    bimodal = np.where(rng.random(z.shape) < 0.5, -a, a) + math.sqrt(1 - a * a) * z
    scenarios = {
        "mean 0.5 sd": z + 0.5,
        "mean 1 sd": z + 1.0,
        "variance x2": z * math.sqrt(2),
        "normal to bimodal": bimodal,
        "gradual drift": z + np.linspace(0, 2, n_post),
    }
    found = {name: delays(rng, post) for name, post in scenarios.items()}
    for name, d in found.items():
        assert d.size >= 0.9 * runs, name
    assert np.median(found["mean 1 sd"]) <= 30
    assert np.median(found["mean 0.5 sd"]) <= 100


# -- state, validation ----------------------------------------------------------------------


def test_state_round_trip_is_exact():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_t(3, 700), rng.normal(2, 1, 300)])
    a = RankCUSUM(reference_size=300)
    run(a, x[:600])
    state = json.loads(json.dumps(a.to_state(), allow_nan=False))
    b = RankCUSUM.from_state(state)
    assert b.to_state() == a.to_state()
    for xi in x[600:].tolist():
        a.update(xi)
        b.update(xi)
        assert a.to_dict() == b.to_dict()
    assert a.to_state() == b.to_state()


@pytest.mark.parametrize(
    "kw",
    [
        {"expected_run_length": 1},
        {"expected_run_length": float("inf")},
        {"expected_run_length": True},
        {"shift": 0},
        {"components": ("location", "mean")},
        {"components": ()},
        {"warmup": 5},
        {"reference_size": 20},
        {"autocorrelation": 1},
    ],
)
def test_invalid_params_are_named(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        RankCUSUM(**kw)


def test_non_finite_input_is_rejected():
    det = RankCUSUM()
    with pytest.raises(ValueError, match="finite"):
        det.update(float("nan"))


# -- invariants (hypothesis) -----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.01, 100.0), shift=st.floats(-1e3, 1e3))
def test_alarms_invariant_under_increasing_transforms(seed, scale, shift):
    # Ranks only: any strictly increasing map of the data gives the same alarms and scores.
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, 150), rng.normal(1.5, 1, 60)])
    a, b, c = RankCUSUM(), RankCUSUM(), RankCUSUM()
    for xi in x.tolist():
        a.update(xi)
        b.update(shift + scale * xi)
        c.update(math.exp(xi / 4))
        assert a.to_dict() == b.to_dict() == c.to_dict()


@pytest.mark.parametrize("name", ["prev", "sxx", "sxy", "rho", "up", "down"])
def test_a_state_with_a_list_of_another_length_is_refused(name):
    # One number per component: a state with a list cut short restored, and the next update
    # raised IndexError (out of the evaluate stage, at every record of the experiment).
    det = RankCUSUM(reference_size=50, warmup=20)
    rng = np.random.default_rng(3)
    for x in rng.normal(size=60):
        det.update(float(x))
    state = json.loads(json.dumps(det.to_state()))
    state[name] = state[name][:-1]
    with pytest.raises(ValueError, match=name):
        RankCUSUM.from_state(state)
