import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from armguard.detectors import LogHistogram, Summary, TwoSampleDrift, WindowDrift
from armguard.detectors.histogram_distance import (
    DISTANCES,
    as_bins,
    histogram_distances,
    merge_bins,
)

EDGES = np.exp(np.linspace(-3, 3, 401))  # a fixed grid of upper edges for multinomial tests


def grid_bins(counts):
    counts = np.asarray(counts, dtype=np.int64)
    keep = counts > 0
    upper = EDGES[: counts.size][keep]
    lower = upper / EDGES[1] * EDGES[0]
    return lower, upper, counts[keep]


# -- raw distances against scipy / direct formulas -------------------------------------------


def test_ks_and_wasserstein_match_scipy_on_bucket_edges():
    rng = np.random.default_rng(1)
    a = Summary.from_values(rng.lognormal(0, 1, 3000))
    b = Summary.from_values(rng.lognormal(0.2, 1.1, 1200))
    (_, ua, ca), (_, ub, cb) = as_bins(a), as_bins(b)
    res = histogram_distances(a, b, alpha=1e-4)
    xa, xb = np.repeat(ua, ca), np.repeat(ub, cb)
    ks = stats.ks_2samp(xa, xb).statistic
    assert res["ks"]["raw"] == pytest.approx(ks, rel=1e-12)
    w = stats.wasserstein_distance(ua, ub, ca, cb)
    assert res["wasserstein"]["raw"] == pytest.approx(w, rel=1e-9)


def test_psi_and_js_match_the_formulas_when_no_bins_merge():
    p_counts = np.array([40, 60, 100, 80, 20])
    q_counts = np.array([50, 50, 90, 70, 40])
    a, b = grid_bins(p_counts), grid_bins(q_counts)
    res = histogram_distances(a, b, alpha=1e-3, max_bins=100, min_expected=1.0)
    n, m, k = p_counts.sum(), q_counts.sum(), 5
    p = (p_counts + 0.5) / (n + 0.5 * k)
    q = (q_counts + 0.5) / (m + 0.5 * k)
    assert res["psi"]["raw"] == pytest.approx(np.sum((p - q) * np.log(p / q)), rel=1e-12)
    mid = (p + q) / 2
    js = 0.5 * np.sum(p * np.log(p / mid)) + 0.5 * np.sum(q * np.log(q / mid))
    assert res["js"]["raw"] == pytest.approx(js, rel=1e-12)
    n_eff = n * m / (n + m)
    assert res["psi"]["null_mean"] == pytest.approx(4 / n_eff)
    assert res["psi"]["threshold"] + res["psi"]["null_mean"] == pytest.approx(
        stats.chi2.isf(1e-3, 4) / n_eff
    )
    assert res["ks"]["threshold"] + res["ks"]["null_mean"] == pytest.approx(
        stats.kstwobign.isf(1e-3) / math.sqrt(n_eff)
    )


def test_wasserstein_null_mean_and_variance_match_a_brownian_bridge_simulation():
    # sqrt(N) W -> int |B(F(x))| dx; check the closed-form mean and variance used for the
    # threshold against a direct simulation of the bridge on the pooled CDF.
    rng = np.random.default_rng(2)
    counts = rng.multinomial(100_000, np.full(50, 1 / 50))
    a = grid_bins(counts)
    res = histogram_distances(a, a, alpha=1e-4)
    upper = a[1]
    dx = np.diff(upper)
    f = (np.cumsum(a[2]) / a[2].sum())[:-1]
    cov = np.minimum.outer(f, f) - np.outer(f, f)
    bridge = rng.multivariate_normal(np.zeros(f.size), cov, size=20_000, method="cholesky")
    integral = np.abs(bridge) @ dx
    n_eff = a[2].sum() / 2
    assert res["wasserstein"]["null_mean"] * math.sqrt(n_eff) == pytest.approx(
        integral.mean(), rel=0.02
    )
    signed = bridge @ dx
    var = (res["wasserstein"]["threshold"] * math.sqrt(n_eff)) ** 2 / (2 * math.log(1e4))
    assert var == pytest.approx(signed.var(), rel=0.05)


# -- calibration under no change -------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "support"), [(100, 100, 400), (5000, 400, 400), (20_000, 20_000, 60)]
)
def test_identical_distributions_score_near_zero_and_rarely_alarm(n, m, support):
    # Sparse (400 buckets, 100 values) or dense: the corrected distances centre on 0 and the
    # exceedance rate at alpha = 0.01 stays near 0.01 (seeded, 300 replications).
    rng = np.random.default_rng(n + m)
    probs = np.diff(stats.lognorm.cdf(EDGES[: support + 1], 1.0))
    probs = np.r_[probs[0], probs[1:]] / probs.sum()
    reps = 300
    pa = rng.multinomial(n, probs[:support] / probs[:support].sum(), size=reps)
    pb = rng.multinomial(m, probs[:support] / probs[:support].sum(), size=reps)
    corrected = {d: [] for d in DISTANCES}
    raw = {d: [] for d in DISTANCES}
    over = dict.fromkeys(DISTANCES, 0)
    for r in range(reps):
        res = histogram_distances(grid_bins(pa[r]), grid_bins(pb[r]), alpha=0.01)
        for d in DISTANCES:
            raw[d].append(res[d]["raw"])
            corrected[d].append(res[d]["corrected"])
            over[d] += res[d]["corrected"] > res[d]["threshold"]
    for d in DISTANCES:
        # The correction removes at least 80% of the sample-size bias of the raw distance
        # (binned KS sits a little below the continuous Kolmogorov mean: conservative).
        assert abs(np.mean(corrected[d])) < 0.2 * np.mean(raw[d]), d
        assert over[d] / reps <= 0.03, d
    assert np.mean(raw["psi"]) < 0.5  # the raw PSI never explodes on sparse buckets


def test_shifted_distribution_is_detected_by_every_distance():
    rng = np.random.default_rng(3)
    a = Summary.from_values(rng.normal(10.0, 1.0, 5000))
    b = Summary.from_values(rng.normal(10.15, 1.0, 5000))
    res = histogram_distances(a, b, alpha=1e-4)
    for d in DISTANCES:
        assert res[d]["corrected"] > res[d]["threshold"], d


def test_merge_bins_equals_histogram_merge():
    rng = np.random.default_rng(4)
    hs = [LogHistogram() for _ in range(3)]
    for h in hs:
        h.update_many(rng.normal(0, 5, 500))
    merged = hs[0].merge(hs[1]).merge(hs[2])
    got = merge_bins([h.bins() for h in hs])
    for x, y in zip(got, merged.bins(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_as_bins_rejects_other_things():
    with pytest.raises(ValueError, match="Summary, a LogHistogram"):
        as_bins(3.0)
    with pytest.raises(ValueError, match="same length"):
        as_bins(([0.0], [1.0, 2.0], [1]))
    with pytest.raises(ValueError, match="non-empty"):
        histogram_distances(Summary(), Summary.from_values(np.ones(3)), alpha=0.01)


# -- detectors -------------------------------------------------------------------------------


def test_two_sample_drift_alarm_is_an_edge_with_hysteresis():
    rng = np.random.default_rng(5)
    det = TwoSampleDrift(distance="ks", clear_fraction=0.5)
    shifts = [0.0] * 5 + [0.3] * 5 + [0.0] * 5
    levels, onsets = [], []
    for mu in shifts:
        control = Summary.from_values(rng.lognormal(0, 1, 3000))
        det.update(Summary.from_values(rng.lognormal(mu, 1, 3000)), control)
        levels.append(det.in_alarm)
        onsets.append(det.alarm)
    assert levels == [False] * 5 + [True] * 5 + [False] * 5
    assert sum(onsets) == 1 and onsets[5]
    assert set(det.to_dict()["distances"]) == set(DISTANCES)


def test_min_effect_floors_the_threshold():
    rng = np.random.default_rng(9)
    control = Summary.from_values(rng.normal(10, 1, 200_000))
    treatment = Summary.from_values(rng.normal(10.03, 1, 200_000))  # real but negligible
    strict = TwoSampleDrift(distance="ks")
    lenient = TwoSampleDrift(distance="ks", min_effect=0.05)
    strict.update(treatment, control)
    lenient.update(treatment, control)
    assert strict.alarm and not lenient.alarm
    assert lenient.threshold == 0.05 and lenient.score == strict.score


def test_two_sample_drift_holds_on_empty_input():
    det = TwoSampleDrift()
    det.update(Summary(), Summary.from_values(np.ones(10)))
    assert not det.in_alarm and det.distances == {}


@pytest.mark.slow
def test_window_drift_false_alarms_and_detection():
    rng = np.random.default_rng(6)
    probs = np.diff(stats.norm.cdf(np.linspace(-4, 4, 201)))
    probs /= probs.sum()
    shifted = np.diff(stats.norm.cdf(np.linspace(-4, 4, 201), loc=0.25))
    shifted /= shifted.sum()
    false_alarms = evaluations = 0
    delays = []
    for _ in range(20):
        det = WindowDrift(
            expected_run_length=1000, reference_intervals=10, window_intervals=3, distance="psi"
        )
        counts = rng.multinomial(300, probs, size=200)
        for c in counts:
            det.update(grid_bins(c))
            evaluations += det.ready
        false_alarms += det.n_alarms
        for i, c in enumerate(rng.multinomial(300, shifted, size=20)):
            det.update(grid_bins(c))
            if det.alarm:
                delays.append(i + 1)
                break
    assert false_alarms / evaluations <= 3 / 1000
    assert len(delays) == 20 and np.median(delays) <= 3


def test_window_drift_windows_and_reset():
    rng = np.random.default_rng(7)
    det = WindowDrift(reference_intervals=2, window_intervals=2)
    parts = [Summary.from_values(rng.normal(10, 1, 100)) for _ in range(5)]
    for i, s in enumerate(parts):
        det.update(s)
        assert det.ready == (i >= 3)
    ref = merge_bins([as_bins(parts[0]), as_bins(parts[1])])
    for x, y in zip(det._reference_bins(), ref, strict=True):
        np.testing.assert_array_equal(x, y)
    direct = histogram_distances(
        merge_bins([as_bins(parts[3]), as_bins(parts[4])]), ref, alpha=1e-4
    )
    assert det.score == direct["psi"]["corrected"]
    det.reset_reference()
    assert not det.ready


@pytest.mark.parametrize("cls", [TwoSampleDrift, WindowDrift])
def test_state_round_trip_is_exact(cls):
    rng = np.random.default_rng(8)
    det = (
        cls(distance="wasserstein")
        if cls is TwoSampleDrift
        else cls(reference_intervals=3, window_intervals=2, distance="wasserstein")
    )

    def step(d, mu):
        a = Summary.from_values(rng.lognormal(mu, 1, 400))
        if cls is TwoSampleDrift:
            d.update(a, Summary.from_values(rng.lognormal(0, 1, 400)))
        else:
            d.update(a)

    for mu in [0, 0, 0, 0, 0.5]:
        step(det, mu)
    state = json.loads(json.dumps(det.to_state(), allow_nan=False))
    twin = cls.from_state(state)
    assert twin.to_state() == det.to_state()
    seed_state = rng.bit_generator.state
    for mu in [0.5, 0, 0]:
        step(det, mu)
    rng.bit_generator.state = seed_state
    for mu in [0.5, 0, 0]:
        step(twin, mu)
    assert twin.to_state() == det.to_state()


@pytest.mark.parametrize(
    "kw",
    [
        {"expected_run_length": 1},
        {"distance": "hellinger"},
        {"max_bins": 1},
        {"min_expected": 0},
        {"clear_fraction": 2},
        {"min_effect": -0.1},
    ],
)
def test_invalid_params_are_named(kw):
    for cls in (TwoSampleDrift, WindowDrift):
        with pytest.raises(ValueError, match=next(iter(kw))):
            cls(**kw)
    with pytest.raises(ValueError, match="window_intervals"):
        WindowDrift(window_intervals=0)


# -- invariants (hypothesis) -----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    a=st.lists(st.integers(0, 50), min_size=3, max_size=40),
    b=st.lists(st.integers(0, 50), min_size=3, max_size=40),
)
def test_distances_are_symmetric_nonnegative_and_zero_on_identical_inputs(a, b):
    a = np.array([*a, 1])
    b = np.array([*b, 1])
    x, y = grid_bins(a), grid_bins(b)
    ab = histogram_distances(x, y, alpha=1e-3)
    ba = histogram_distances(y, x, alpha=1e-3)
    aa = histogram_distances(x, x, alpha=1e-3)
    for d in DISTANCES:
        assert ab[d]["raw"] >= -1e-15
        assert ab[d]["raw"] == pytest.approx(ba[d]["raw"], rel=1e-9, abs=1e-15)
        assert ab[d]["threshold"] == pytest.approx(ba[d]["threshold"], rel=1e-9, abs=1e-15)
        assert aa[d]["raw"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("distance", DISTANCES)
def test_window_drift_grid_matches_merging_the_windows_every_update(distance):
    # WindowDrift moves its window on a grid of edges instead of merging it every update; on a
    # feature whose buckets keep changing (new edges, retired edges, a grid rebuild, explicit
    # zero counts, empty intervals, a state round trip) every score and distance equals the
    # direct computation.
    rng = np.random.default_rng(10)
    det = WindowDrift(reference_intervals=3, window_intervals=2, distance=distance)
    parts = []
    for i in range(80):
        n = 0 if i % 17 == 16 else 300
        bins = as_bins(Summary.from_values(rng.lognormal(0.08 * i, 0.2, n)))
        if i % 11 == 5:  # a tuple listing buckets with a count of 0
            lower, upper, counts = bins
            bins = (lower, upper, np.where(np.arange(counts.size) < 3, 0, counts))
        parts.append(bins)
        det.update(bins)
        if i == 40:
            det = WindowDrift.from_state(json.loads(json.dumps(det.to_state())))
        if i < 4:
            continue
        recent = merge_bins(parts[-2:])
        if not recent[2].sum():
            continue
        direct = histogram_distances(recent, merge_bins(parts[:3]), alpha=1e-4)
        assert det.score == pytest.approx(direct[distance]["corrected"], rel=1e-12, abs=1e-15)
        assert det.threshold == pytest.approx(direct[distance]["threshold"], rel=1e-12)
        for d, value in det.distances.items():
            assert value == pytest.approx(direct[d]["corrected"], rel=1e-12, abs=1e-15), d


def test_window_drift_keeps_buckets_listed_with_zero_counts_as_merging_does():
    # A bucket listed with a count of 0 belongs to the union like any other: here it is the
    # lowest one and forms a merged bin of its own (the next bucket holds most of the mass).
    counts = np.zeros(40, dtype=np.int64)
    counts[10:30] = 20
    counts[9] = 2000
    listed = np.r_[3, 9:30]
    window_bins = (EDGES[listed] / EDGES[1] * EDGES[0], EDGES[listed], counts[listed])
    reference = grid_bins(np.r_[np.zeros(9, dtype=np.int64), 2000, np.full(20, 20)])
    det = WindowDrift(reference_intervals=1, window_intervals=1, distance="psi")
    det.update(reference)
    det.update(window_bins)
    direct = histogram_distances(window_bins, reference, alpha=1e-4)
    assert direct["_sizes"]["bins"] == 4  # the empty lowest bucket is a merged bin of its own
    assert det.score == direct["psi"]["corrected"]
    assert det.threshold == direct["psi"]["threshold"]


# -- alignment by bucket key -----------------------------------------------------------------


def random_histogram(rng, relative_accuracy):
    """A LogHistogram of one of several shapes: signs, zeros, tiny values, collapsed stores."""
    h = LogHistogram(relative_accuracy=relative_accuracy, max_bins=int(rng.choice([16, 64, 2048])))
    n = int(rng.choice([0, 1, 3, 20, 300, 2000]))
    kind = int(rng.integers(0, 6))
    if kind == 0:
        values = rng.lognormal(rng.normal(0, 2), rng.uniform(0.1, 3), n)
    elif kind == 1:
        values = rng.normal(rng.normal(0, 3), rng.uniform(0.1, 5), n)
    elif kind == 2:
        values = np.where(rng.random(n) < 0.2, 0.0, rng.normal(0, 1, n))
    elif kind == 3:
        values = -rng.lognormal(0, 1, n)
    elif kind == 4:
        values = rng.choice([0.0, 1.0, 2.5, -3.0, 1e-320], n)
    else:  # far apart magnitudes: the layout would be wide, the edge alignment is used
        values = rng.choice([1e-120, 1e90, -1e80], n)
    h.update_many(values)
    return h


def test_key_alignment_matches_the_alignment_of_the_bins():
    # The bins-tuple path is the original alignment; LogHistograms of one relative accuracy
    # take the key path. Same merged bins, and every distance equal to the last bit.
    rng = np.random.default_rng(20)
    compared = 0
    for _ in range(1500):
        ra = float(rng.choice([0.01, 0.05, 0.2]))
        a, b = random_histogram(rng, ra), random_histogram(rng, ra)
        if not a.count or not b.count:
            continue
        min_expected = float(rng.choice([1.0, 5.0, 20.0]))
        max_bins = int(rng.choice([2, 5, 20, 100]))
        by_key = histogram_distances(a, b, alpha=1e-3, max_bins=max_bins, min_expected=min_expected)
        by_edge = histogram_distances(
            a.bins(), b.bins(), alpha=1e-3, max_bins=max_bins, min_expected=min_expected
        )
        assert by_key == by_edge
        compared += 1
    assert compared > 1000


def test_histograms_of_different_accuracy_are_aligned_by_edge():
    rng = np.random.default_rng(21)
    a = Summary.from_values(rng.lognormal(0, 1, 500), relative_accuracy=0.01)
    b = Summary.from_values(rng.lognormal(0, 1, 500), relative_accuracy=0.02)
    assert histogram_distances(a, b, alpha=1e-3) == histogram_distances(
        a.histogram.bins(), b.histogram.bins(), alpha=1e-3
    )


@pytest.mark.parametrize("distance", DISTANCES)
def test_two_sample_drift_on_summaries_matches_bins_tuples(distance):
    rng = np.random.default_rng(22)
    on_summaries = TwoSampleDrift(distance=distance, expected_run_length=50)
    on_tuples = TwoSampleDrift(distance=distance, expected_run_length=50)
    onsets = 0
    for i in range(150):
        mu = 0.3 if (i // 10) % 3 == 2 else 0.0
        t = Summary.from_values(rng.normal(mu, 1, int(rng.integers(0, 400))))
        c = Summary.from_values(rng.normal(0, 1, int(rng.integers(1, 400))))
        on_summaries.update(t, c)
        on_tuples.update(t.histogram.bins(), c.histogram.bins())
        assert on_summaries.to_state() == on_tuples.to_state()
        onsets += on_summaries.alarm
    assert onsets >= 3


# -- diagnostic distances: computed when read, never by a snapshot ---------------------------


def test_state_holds_the_distances_known_and_reading_them_computes_all_four():
    rng = np.random.default_rng(23)
    t = Summary.from_values(rng.lognormal(0.1, 1, 2000))
    c = Summary.from_values(rng.lognormal(0, 1, 2000))
    det = TwoSampleDrift(distance="ks")
    det.update(t, c)
    state = det.to_state()
    assert state["distances"] == {"ks": det.score}  # a snapshot does not compute the others
    twin = TwoSampleDrift.from_state(json.loads(json.dumps(state)))
    assert twin.to_state() == state and twin.distances == {"ks": det.score}
    direct = histogram_distances(t, c, alpha=1e-4)
    assert det.distances == {d: direct[d]["corrected"] for d in DISTANCES}
    read = det.to_state()
    assert read["distances"] == det.distances  # once read they are known, and kept
    assert TwoSampleDrift.from_state(read).to_dict() == det.to_dict()


def test_states_written_with_all_four_distances_still_load():
    rng = np.random.default_rng(24)
    det = TwoSampleDrift(distance="psi")
    det.update(
        Summary.from_values(rng.lognormal(0, 1, 900)), Summary.from_values(rng.lognormal(0, 1, 900))
    )
    old = {
        **det.to_state(),
        "distances": {"psi": det.score, "js": 0.1, "ks": 0.2, "wasserstein": 0.3},
    }
    twin = TwoSampleDrift.from_state(old)
    assert twin.distances == old["distances"] and twin.to_state() == old
    assert twin.score == det.score and twin.threshold == det.threshold


# -- batched updates -------------------------------------------------------------------------


def random_drift_detector(rng):
    return TwoSampleDrift(
        distance=str(rng.choice(DISTANCES)),
        expected_run_length=float(rng.choice([20.0, 1e4])),
        min_expected=float(rng.choice([1.0, 5.0])),
        max_bins=int(rng.choice([5, 20])),
    )


def random_pair(rng):
    """A (treatment, control) pair of mixed sizes and shapes, sometimes shifted or empty."""
    ra = float(rng.choice([0.01, 0.05]))
    a, b = random_histogram(rng, ra), random_histogram(rng, ra)
    if rng.random() < 0.5:  # Summaries, sometimes with a real difference
        n, m = int(rng.choice([0, 50, 800])), int(rng.integers(1, 800))
        shift = float(rng.choice([0.0, 0.0, 0.4]))
        a = Summary.from_values(rng.normal(shift, 1, n), relative_accuracy=ra)
        b = Summary.from_values(rng.normal(0, 1, m), relative_accuracy=ra)
    return a, b


def test_batch_distances_equal_the_single_pair_distances():
    from armguard.detectors._histogram_batch import batch_distances

    rng = np.random.default_rng(30)
    pairs = [random_pair(rng) for _ in range(600)]
    hists = [(getattr(a, "histogram", a), getattr(b, "histogram", b)) for a, b in pairs]
    params = {
        "alpha": rng.choice([1e-3, 1e-4], len(pairs)).tolist(),
        "min_expected": rng.choice([1.0, 5.0, 20.0], len(pairs)).tolist(),
        "max_bins": rng.choice([2, 5, 20, 100], len(pairs)).tolist(),
    }
    res = batch_distances(hists, **params, distances=set(DISTANCES), thresholds=set(DISTANCES))
    checked = 0
    for i, (a, b) in enumerate(hists):
        assert (res["n"][i], res["m"][i]) == (a.count, b.count)
        if not a.count or not b.count:
            continue
        one = histogram_distances(
            a,
            b,
            alpha=params["alpha"][i],
            min_expected=params["min_expected"][i],
            max_bins=params["max_bins"][i],
        )
        assert res["bins"][i] == one["_sizes"]["bins"]  # the same merged bins
        for name in DISTANCES:
            raw, null, thr = (res[name][j][i] for j in range(3))
            assert raw == pytest.approx(one[name]["raw"], rel=1e-12, abs=1e-300)
            assert null == pytest.approx(one[name]["null_mean"], rel=1e-12)
            # Wasserstein's variance is a difference of two sums: rounding shows at 1e-12.
            assert thr == pytest.approx(
                one[name]["threshold"], rel=1e-12 if name != "wasserstein" else 1e-9
            )
        checked += 1
    assert checked > 350


def test_a_pairs_batch_result_does_not_depend_on_the_rest_of_the_batch():
    # Bit for bit: the daemon's decisions must not depend on how records were batched.
    rng = np.random.default_rng(31)
    pairs = [random_pair(rng) for _ in range(300)]
    specs = [random_drift_detector(rng).to_state() for _ in pairs]
    together = [TwoSampleDrift.from_state(s) for s in specs]
    TwoSampleDrift.update_many(together, pairs, all_distances=True)
    for i in rng.choice(len(pairs), 40, replace=False):
        alone = TwoSampleDrift.from_state(specs[i])
        TwoSampleDrift.update_many([alone], [pairs[i]], all_distances=True)
        assert alone.to_state() == together[i].to_state()
    # Fewer than 8 PSI or KS pairs take a single-pair form of the same arithmetic.
    for i in range(len(pairs)):
        alone = TwoSampleDrift.from_state(specs[i])
        TwoSampleDrift.update_many([alone], [pairs[i]])
        got = (alone.score, alone.threshold, alone.alarm, alone.in_alarm)
        assert got == (
            together[i].score,
            together[i].threshold,
            together[i].alarm,
            together[i].in_alarm,
        )
    shuffled = [TwoSampleDrift.from_state(s) for s in specs]
    order = rng.permutation(len(pairs))
    TwoSampleDrift.update_many([shuffled[i] for i in order], [pairs[i] for i in order])
    for a, b in zip(shuffled, together, strict=True):
        assert (a.score, a.threshold, a.alarm) == (b.score, b.threshold, b.alarm)


def test_batched_updates_raise_the_same_alarms_as_single_updates():
    rng = np.random.default_rng(32)
    specs = [random_drift_detector(rng).to_state() for _ in range(40)]
    single = [TwoSampleDrift.from_state(s) for s in specs]
    batched = [TwoSampleDrift.from_state(s) for s in specs]
    onsets = 0
    for _ in range(25):
        pairs = [random_pair(rng) for _ in specs]
        for det, (t, c) in zip(single, pairs, strict=True):
            det.update(t, c)
        TwoSampleDrift.update_many(batched, pairs)
        for a, b in zip(single, batched, strict=True):
            assert (a.alarm, a.in_alarm, a.n_alarms) == (b.alarm, b.in_alarm, b.n_alarms)
            assert b.score == pytest.approx(a.score, rel=1e-12, abs=1e-15)
            assert b.threshold == pytest.approx(a.threshold, rel=1e-9)
            onsets += b.alarm
    assert onsets > 20
    # Only the decision distance is computed in a batch, unless asked for all four.
    assert all(set(b.distances) <= {b.distance} for b in batched)


def test_update_many_holds_on_empty_arms_and_takes_any_input():
    rng = np.random.default_rng(33)
    c = Summary.from_values(rng.normal(0, 1, 500))
    t = Summary.from_values(rng.normal(1, 1, 500))
    dets = [TwoSampleDrift(distance="ks") for _ in range(5)]
    pairs = [
        (t, c),
        (Summary(), c),  # an empty arm: nothing evaluated, the alarm level is kept
        (t.histogram.bins(), c.histogram.bins()),  # tuples: evaluated singly
        (Summary.from_values(rng.normal(1, 1, 500), relative_accuracy=0.02), c),
        (t.histogram, c.histogram),
    ]
    TwoSampleDrift.update_many(dets, pairs)
    assert [d.in_alarm for d in dets] == [True, False, True, True, True]
    assert dets[1].distances == {} and dets[1].n_alarms == 0
    twin = TwoSampleDrift(distance="ks")
    twin.update(t, c)
    assert dets[0].score == pytest.approx(twin.score, rel=1e-12)
    assert dets[2].to_state() == twin.to_state()  # the single path, bit for bit
    assert set(dets[2].distances) == set(DISTANCES)  # and its pair is kept for the others
    TwoSampleDrift.update_many([], [])
    with pytest.raises(ValueError):
        TwoSampleDrift.update_many(dets, pairs[:2])


def test_update_many_applies_a_detector_listed_twice_in_order():
    rng = np.random.default_rng(34)
    c = Summary.from_values(rng.normal(0, 1, 2000))
    moved = Summary.from_values(rng.normal(0.5, 1, 2000))
    same = Summary.from_values(rng.normal(0, 1, 2000))
    batched, single = TwoSampleDrift(), TwoSampleDrift()
    TwoSampleDrift.update_many([batched, batched], [(moved, c), (same, c)])
    single.update(moved, c)
    single.update(same, c)
    assert batched.n_alarms == single.n_alarms == 1
    assert (batched.in_alarm, batched.alarm) == (single.in_alarm, single.alarm) == (False, False)


@pytest.mark.parametrize("distance", [*DISTANCES, "mixed"])
def test_update_many_batch_of_summaries_equals_batches_of_one(distance, monkeypatch):
    # A batch of Summaries (the daemon's) takes update_many's inlined decision (_decide_batch,
    # _decide_many): bit for bit what batches of one decide through evaluate_many and _decide
    # (PSI and KS alone: the single-pair forms equal to the batch), with min_effect,
    # hysteresis, onsets, clears, an empty side (held) and a detector listed twice, across
    # the chunk boundary of the vectorised pass (300 detectors), of one distance or mixed.
    from armguard.detectors import two_sample_drift

    inlined = []
    spied = two_sample_drift._decide_many
    monkeypatch.setattr(
        two_sample_drift,
        "_decide_many",
        lambda dets, *rest: (inlined.append(len(dets)), spied(dets, *rest))[1],
    )
    rng = np.random.default_rng(37)
    pool = [
        Summary.from_values(
            rng.lognormal(0.3 * (i % 3), 1.0, int(rng.choice([0, 60, 400]) if i else 0))
        )
        for i in range(25)
    ]
    batched = [
        TwoSampleDrift(
            distance=str(rng.choice(DISTANCES)) if distance == "mixed" else distance,
            expected_run_length=float(rng.choice([20.0, 1e4])),
            min_expected=float(rng.choice([1.0, 5.0])),
            max_bins=int(rng.choice([5, 20])),
            min_effect=float(rng.choice([0.0, 0.02, 0.2])),
            clear_fraction=float(rng.choice([0.0, 0.5, 1.0])),
        )
        for _ in range(300)
    ]
    alone = [TwoSampleDrift.from_state(d.to_state()) for d in batched]
    held = clears = 0
    for step in range(12):
        for j in range(step % 3, 300, 37):  # singly first: these keep their pair (_pair)
            pair = (pool[(j + step) % 25], pool[(2 * j + 1) % 25])
            TwoSampleDrift.update_many([batched[j]], [pair])
            TwoSampleDrift.update_many([alone[j]], [pair])
        was = [d.in_alarm for d in batched]
        order = [*range(300), 7]
        pairs = [
            (pool[(3 * j + step * (1 + j % 4)) % 25], pool[(5 * j + 2 * step + 1) % 25])
            for j in order
        ]
        TwoSampleDrift.update_many([batched[j] for j in order], pairs)
        evaluated = {}  # detector -> whether its last update in the batch was evaluated
        for j, pair in zip(order, pairs, strict=True):
            TwoSampleDrift.update_many([alone[j]], [pair])
            evaluated[j] = bool(pair[0].count and pair[1].count)
            held += not evaluated[j]
        for j, (a, b, before) in enumerate(zip(alone, batched, was, strict=True)):
            assert (a.alarm, a.in_alarm, a.n_alarms) == (b.alarm, b.in_alarm, b.n_alarms)
            assert (a.score, a.threshold) == (b.score, b.threshold)
            assert a.to_state() == b.to_state()
            if evaluated[j]:  # only the batch's distance, no diagnostics of an older pair
                assert b.distances == {b.distance: b.score}
            clears += before and not b.in_alarm
    assert sum(d.n_alarms for d in batched) > 80 and clears > 30 and held > 100
    assert inlined == [301] * 12  # every big batch took the inlined decision, no batch of one


def test_update_many_with_all_distances_keeps_them_in_the_state():
    rng = np.random.default_rng(35)
    pairs = [random_pair(rng) for _ in range(30)]
    pairs = [(a, b) for a, b in pairs if getattr(a, "count", 0) and getattr(b, "count", 0)]
    dets = [TwoSampleDrift(distance="wasserstein") for _ in pairs]
    TwoSampleDrift.update_many(dets, pairs, all_distances=True)
    for det, (a, b) in zip(dets, pairs, strict=True):
        direct = histogram_distances(a, b, alpha=1e-4)
        assert det.distances == pytest.approx(
            {d: direct[d]["corrected"] for d in DISTANCES}, rel=1e-12, abs=1e-15
        )
        assert TwoSampleDrift.from_state(det.to_state()).to_dict() == det.to_dict()


def test_window_drift_state_packs_each_histogram_once_and_stays_exact():
    # A state taken after every update (the daemon) equals one taken at checkpoints only,
    # through the reference phase, the sliding window and a new reference; mutating a returned
    # state does not reach the detector.
    rng = np.random.default_rng(36)
    every = WindowDrift(reference_intervals=4, window_intervals=3, distance="ks")
    sometimes = WindowDrift(reference_intervals=4, window_intervals=3, distance="ks")
    for i in range(30):
        s = Summary.from_values(rng.lognormal(0.3 if i > 15 else 0.0, 1, 300))
        every.update(s)
        sometimes.update(s)
        state = every.to_state()
        if i % 7 == 3:
            assert state == sometimes.to_state()
            assert WindowDrift.from_state(json.loads(json.dumps(state))).to_state() == state
        if i == 20:
            every.reset_reference()
            sometimes.reset_reference()
        # Counts are immutable strings; the lists around them are the state's own.
        state["reference"][0].append(99)
        state["reference"][2] += "AA"
        for packed in state["window"]:
            packed[0].append(99)
            packed[2] += "AA"
        state["window"].append(state["reference"])
    assert every.to_state() == sometimes.to_state()
    assert every.n_alarms >= 1
