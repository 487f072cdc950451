import functools
import json
import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from armguard.detectors import SeasonalZScore
from armguard.detectors._calibration import cusum_threshold, normal_isf
from armguard.detectors.seasonal_zscore import _cusum_thresholds, _heavy_evidence_law

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
    # Issue 4: at most 2 false alarms per 10,000 evaluations on i.i.d. streams, 10 on
    # autocorrelated ones. Counted per armed evaluation (none is possible in the 2-day warmup,
    # which counted before and lowered the rate by 12/14) and pooled over six seeds: one seed's
    # 8 streams give 0.4-2.5 per 10,000 at phi 0 (pooled ~1.5), so one seed alone decides
    # nothing about a target of 2.
    alarms = n = 0
    for seed in range(4, 10):
        rng = np.random.default_rng(seed)
        for _ in range(8):
            t, x = seasonal_series(rng, 14, phi=phi)
            det = SeasonalZScore(expected_run_length=10_000)
            feed(det, x, t)
            alarms += det.n_alarms
            n += x.size - 2 * DAY  # evaluations after the warmup
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


@functools.lru_cache(maxsize=16)
def heavy_tailed_first_days(seed, phi, runs=60):
    """False alarms of each t(3) stream in its first five armed days, and the evaluations."""
    rng = np.random.default_rng(seed)
    per_stream = []
    for _ in range(runs):
        t, x = seasonal_series(rng, 7, phi=phi, df=3)
        per_stream.append(len(feed(SeasonalZScore(expected_run_length=10_000), x, t)))
    return tuple(per_stream), runs * 5 * DAY


@pytest.mark.slow
@pytest.mark.parametrize("phi", [0.0, 0.5])
def test_heavy_tailed_false_alarms_meet_the_target_from_the_first_armed_day(phi):
    # Issue 4: at most 10 false alarms per 10,000 evaluations on heavy-tailed streams. The hard
    # part is the first armed days, while the tail is still being learned (bench/drift.py counts
    # days 3-7). Every seed's 60 streams within the target, and pooled over eight seeds clearly
    # below it: 4.7-9.3 by seed and 6.0 pooled at phi 0, 4.6-8.8 and 6.5 at phi 0.5. Before
    # flagged spikes counted as censored tail observations: 6.1-12.6 (seed 17) and 7.8 pooled
    # at phi 0, 5.2-9.5 and 6.7 at phi 0.5, the alarms clustered on a few streams (see below).
    rates = []
    alarms = n = 0
    for seed in range(11, 19):
        per_stream, evaluations = heavy_tailed_first_days(seed, phi)
        rates.append(sum(per_stream) / evaluations * 1e4)
        alarms += sum(per_stream)
        n += evaluations
    assert max(rates) <= 10
    assert alarms / n * 1e4 <= 7


@pytest.mark.slow
@pytest.mark.parametrize("phi", [0.0, 0.5])
def test_no_heavy_tailed_stream_spends_ten_times_the_budget(phi):
    # At 10 false alarms per 10,000, a stream's 5 armed days (1,440 evaluations) expect 1.4;
    # 10 or more is a ~1e-6 event for Poisson alarms. Flagged spikes used to be left out of q,
    # the Hill mean and the evidence: on a t(3) stream whose tail was not recognised by the end
    # of the warmup, every large value was flagged, q stayed under twice the normal rate (0.004
    # where unflagged t(3) noise gives ~0.015) and the tail was never learned: 5 of these 480
    # streams at phi 0 raised 10-17 (three among seed 17's 60). Counted as censored tail
    # observations, the most any stream raises is 9 at phi 0 and 8 at phi 0.5.
    worst = max(max(heavy_tailed_first_days(seed, phi)[0]) for seed in range(11, 19))
    assert worst < 10


def test_a_censored_spike_feeds_the_tail_at_a_heavy_tails_pace_not_a_bursts():
    # Under the normal threshold a flagged spike counts in q, the Hill mean and the heavy-tail
    # evidence (with the band's log likelihood ratio), as a censored tail observation, if it
    # comes 48 updates or more after the previous spike and a token is left (1.5 at most, 0.007
    # more per unflagged update). A spike right after it, or 48 updates later with the bucket
    # still under 1, stays out of the tail estimates, as does one above a Pareto threshold.
    rng = np.random.default_rng(21)
    det = SeasonalZScore(season_bins=0, warmup_s=DAY * STEP)
    i = 0

    def quiet(count):
        nonlocal i
        for xi in rng.normal(10.0, 1.0, count).tolist():
            det.update(xi, i * STEP)
            i += 1

    def spike(z, censored):
        nonlocal i
        det._up = det._down = 0.0  # one spike is no level shift (the CUSUM stays below h / 2)
        keys = ("q", "evidence", "hill", "n_tail", "n_exceed", "mgf", "tokens")
        before = {k: getattr(det, "_" + k) for k in keys}
        spikes = det.n_spikes
        det.update(det._level + det._phi * det._prev + z * math.sqrt(det._var), i * STEP)
        i += 1
        assert det.n_spikes == spikes + 1
        assert det.score == pytest.approx(abs(z))
        if not censored:
            assert {k: getattr(det, "_" + k) for k in keys} == before
            return
        step = max(0.001, 1 / det._n_tail)
        assert det._n_tail == before["n_tail"] + 1
        assert det._q == before["q"] + step * (1.0 - before["q"])
        assert det._evidence == before["evidence"] + step * (det._ev_band - before["evidence"])
        assert det._n_exceed == before["n_exceed"] + 1 and det._hill > before["hill"]
        assert det._mgf == before["mgf"]  # left out of the CUSUM calibration
        assert det._tokens == before["tokens"] - 1.0

    quiet(2 * DAY)
    assert det.threshold == det._z_normal and det._tokens == 1.5
    spike(5.0, censored=True)
    spike(-5.0, censored=False)  # right after: a burst
    quiet(47)
    assert det._tokens < 1.0
    spike(5.0, censored=False)  # 48 updates on, but no token
    quiet(60)
    assert det._tokens >= 1.0
    spike(-5.0, censored=True)
    # A spike above a Pareto threshold is not censored: its tail is known.
    quiet(60)
    det._q, det._evidence, det._tokens = 0.02, 0.01, 1.5
    assert det.threshold > det._z_normal
    spike(1.01 * det.threshold, censored=False)


def test_a_burst_of_spikes_does_not_pass_for_a_heavy_tail():
    # Ten 8-sd spikes on the first armed day, then a 10-sd spike on day 4: the spikes are
    # flagged and kept out of the tail estimates, so the threshold stays normal and finds it.
    found = 0
    for seed in range(20):
        rng = np.random.default_rng(200 + seed)
        t, x = seasonal_series(rng, 5)
        x[rng.choice(np.arange(2 * DAY, 3 * DAY), size=10, replace=False)] += (
            rng.choice([-1, 1], size=10) * 16.0
        )
        at = int(rng.integers(3 * DAY, 4 * DAY))
        x[at] += 20.0
        det = SeasonalZScore()
        for i, (xi, ti) in enumerate(zip(x.tolist(), t.tolist(), strict=True)):
            det.update(xi, ti)
            if i == at:
                found += det.in_alarm
    assert found == 20


def test_five_warmup_spikes_leave_a_day3_spike_found_on_most_seeded_series():
    # Five 15-sd spikes in the warmup's second half: the heavy-tail evidence gives nothing to
    # values beyond 2 clips, so the tail mostly stays normal (found in 39 of 40 seeds; the rules
    # before, on the band count alone: 35). Many more outliers inflate the robust scale until
    # the bulk looks peaked (twenty in a day: 3 of 40, and 9 before), see the class docstring.
    flagged = 0
    for seed in range(40):
        t, _, x, at = warmup_spikes(100 + seed, n_spikes=5)
        flagged += (at, "spike") in feed(SeasonalZScore(), x, t)
    assert flagged >= 38


@pytest.mark.parametrize("clip", [1.2, 2.0, 3.0, 4.5])
def test_heavy_tail_evidence_is_the_t4_normal_log_likelihood_ratio(clip):
    const, a, bulk, shoulder, band, normal_mean, s = _heavy_evidence_law(clip)
    # The t(4) law of z = X / s has the normal clipped second moment (the robust scale's).
    kappa = stats.norm.expect(lambda z: min(z * z, clip * clip))
    moment = stats.t.expect(lambda v: min((v / s) ** 2, clip * clip), args=(4,))
    assert moment == pytest.approx(kappa, rel=1e-7)
    assert s == pytest.approx(
        optimize.brentq(
            lambda u: stats.t.expect(lambda v: min((v / u) ** 2, clip * clip), args=(4,)) - kappa,
            0.5,
            3.0,
        ),
        rel=1e-6,
    )

    def heavy_density(z):  # density of |z| under each law
        return 2 * s * stats.t.pdf(s * z, 4)

    for z in np.linspace(0.0, bulk, 7):
        ratio = np.log(heavy_density(z) / (2 * stats.norm.pdf(z)))
        assert const - 2.5 * math.log1p(a * z * z) + 0.5 * z * z == pytest.approx(ratio, abs=1e-12)

    def category(lo, hi):
        heavy = stats.t.cdf(s * hi, 4) - stats.t.cdf(s * lo, 4)
        return min(2.0, math.log(heavy / (stats.norm.sf(lo) - stats.norm.sf(hi))))

    assert band == pytest.approx(category(clip, 2 * clip), rel=1e-9)
    if clip > 1.5:
        assert shoulder == pytest.approx(category(1.5, clip), rel=1e-9)
    else:
        assert (bulk, shoulder) == (clip, 0.0)
    bulk_mean = integrate.quad(
        lambda z: 2 * stats.norm.pdf(z) * (const - 2.5 * math.log1p(a * z * z) + 0.5 * z * z),
        0,
        bulk,
    )[0]
    expected = (
        bulk_mean
        + shoulder * 2 * (stats.norm.sf(bulk) - stats.norm.sf(clip))
        + band * 2 * (stats.norm.sf(clip) - stats.norm.sf(2 * clip))
    )
    assert normal_mean == pytest.approx(expected, abs=1e-6)
    assert normal_mean < 0.0  # minus a Kullback-Leibler divergence


def test_cusum_thresholds_scale_with_the_effective_variance():
    table = _cusum_thresholds(40_000.0, 1.0)
    assert table[0] == cusum_threshold(40_000.0, 1.0)
    for i, h in enumerate(table):
        v = 1.0 + 0.05 * i
        # Same Siegmund run length for the standardised CUSUM (k / sd, h / sd).
        assert h / math.sqrt(v) == pytest.approx(cusum_threshold(40_000.0, 1.0 / math.sqrt(v)))


def _clipped_t_mgf(df: int, k: float, clip: float):
    """E[exp(theta (zc - k))] of Student t(df) innovations on the normal clipped scale (scaled so
    the clipped second moment is the normal's) and clipped at +-clip, as a function of theta."""
    kappa = stats.norm.expect(lambda z: min(z * z, clip * clip))
    s = optimize.brentq(
        lambda u: stats.t.expect(lambda v: min((v / u) ** 2, clip * clip), args=(df,)) - kappa,
        0.5,
        3.0,
    )

    def mgf(theta):
        inner = integrate.quad(
            lambda z: math.exp(theta * (z - k)) * s * stats.t.pdf(s * z, df), -clip, clip
        )[0]
        tail = stats.t.sf(s * clip, df)
        return inner + tail * (math.exp(theta * (clip - k)) + math.exp(theta * (-clip - k)))

    return mgf


@pytest.mark.parametrize("df", [3, 5, 10])
def test_effective_variance_recovers_the_cusum_exponent_of_clipped_heavy_tails(df):
    # The claim behind the calibration: for clipped Student t innovations (on the normal clipped
    # scale) the normal law whose MGF at theta0 = 2 k matches theirs has nearly their root
    # theta* of E[exp(theta (zc - k))] = 1, which sets the CUSUM's run length (Siegmund 1985).
    k, clip = 1.0, 3.0
    mgf = _clipped_t_mgf(df, k, clip)
    root = optimize.brentq(lambda th: mgf(th) - 1.0, 0.5, 2.0 * k - 1e-3)
    theta0 = 2 * k
    v = 2 * (math.log(mgf(theta0)) + k * theta0) / theta0**2
    assert v > 1.0  # heavier shoulders than normal: a larger threshold
    assert 2 * k / v == pytest.approx(root, rel=0.02)


@pytest.mark.parametrize("phi", [0.0, 0.5])
def test_a_detected_shift_moves_the_level_by_the_mean_since_the_change_point(phi):
    # Hinkley (1971): on detection the level moves by the mean residual since the CUSUM last
    # left 0, an estimate of the shift with the noise of many updates averaged out, instead of
    # the current residual (one update's noise; 0.76-1.3 mean error here, which starts echo
    # shifts). A 3-sd shift after a short warmup, 100 streams: ~0.4-0.5 here.
    errors = []
    for seed in range(100):
        rng = np.random.default_rng(3000 + seed)
        e = rng.standard_normal(600)
        r = np.empty_like(e)
        r[0] = e[0]
        for i in range(1, 600):
            r[i] = phi * r[i - 1] + e[i]
        x = 10.0 + r
        x[400:] += 3.0
        det = SeasonalZScore(season_bins=0, warmup_s=200 * STEP)
        for i, xi in enumerate(x.tolist()):
            before = det._level
            det.update(xi, i * STEP)
            if det.alarm and det.kind == "level_shift" and i >= 400:
                errors.append(det._level - before - 3.0)
                break
    assert len(errors) >= 60
    assert np.mean(np.abs(errors)) < 0.6


@pytest.mark.parametrize("df", [3, 5])
def test_learned_cusum_threshold_is_that_of_the_clipped_noise_mgf(df):
    # The threshold the detector reaches on i.i.d. Student t noise is the one the exact MGF of
    # the clipped innovations at theta0 = 2 k gives (5.28 for t(3), 4.93 for t(5) at the
    # defaults), not merely "raised": learned from |z| unclipped, t(3) reaches the table's top.
    k, clip = 1.0, 3.0
    exact = SeasonalZScore()
    exact._mgf = _clipped_t_mgf(df, k, clip)(2 * k)
    learned = []
    for seed in range(12):
        x = np.random.default_rng(seed).standard_t(df, 6 * DAY)
        det = SeasonalZScore(season_bins=0)
        for i, xi in enumerate(x.tolist()):
            det.update(xi, i * STEP)
        learned.append(det.cusum_threshold)
    assert np.median(learned) == pytest.approx(exact.cusum_threshold, rel=0.05)
    assert np.all(np.abs(np.array(learned) / exact.cusum_threshold - 1) < 0.15)


def test_heavy_tails_raise_the_cusum_threshold_normal_noise_keeps_it():
    h0 = cusum_threshold(40_000, 1.0)
    rng = np.random.default_rng(14)
    t, x = seasonal_series(rng, 6, df=3)
    det = SeasonalZScore()
    feed(det, x, t)
    assert det.cusum_threshold > 1.1 * h0
    t, x = seasonal_series(rng, 6)
    det = SeasonalZScore()
    feed(det, x, t)
    assert det.cusum_threshold < 1.05 * h0


def test_min_scale_keeps_sparse_counts_quiet():
    rng = np.random.default_rng(7)
    t = np.arange(6 * DAY) * STEP
    x = rng.poisson(0.05, t.size).astype(float)
    x[5 * DAY] = 6.0  # six errors in one interval is an anomaly even so
    det = SeasonalZScore(min_scale=1.0)
    assert feed(det, x, t) == [(5 * DAY, "spike")]


def warmup_spikes(seed, n_spikes=2):
    """Seeded normal series; ``n_spikes`` 15-sd spikes on day 2 (warmup), a 20-sd one on day 3."""
    rng = np.random.default_rng(seed)
    t, x = seasonal_series(rng, 4)
    clean = x.copy()
    x[rng.choice(np.arange(DAY, 2 * DAY), size=n_spikes, replace=False)] += 15 * 2.0
    at = int(rng.integers(2 * DAY, 3 * DAY))
    x[at] += 20 * 2.0
    return t, clean, x, at


def day3_thresholds(x, t):
    det = SeasonalZScore()
    out = []
    for i, (xi, ti) in enumerate(zip(x.tolist(), t.tolist(), strict=True)):
        det.update(xi, ti)
        if 2 * DAY <= i < 3 * DAY:
            out.append(det.threshold)
    return np.array(out)


def test_warmup_spikes_do_not_blind_the_spike_threshold():
    # Two 15-sd spikes in the warmup's second half fed the heavy-tail (Hill) estimate as if they
    # were its tail: the threshold rose to hundreds of sd on days 3 and 4, and a 20-sd spike on
    # day 3 went unflagged. A couple of outliers must leave it at its clean-series value.
    t, clean, x, at = warmup_spikes(12)
    det = SeasonalZScore()
    onsets = feed(det, x, t)
    assert (at, "spike") in onsets
    assert np.array_equal(day3_thresholds(x, t), day3_thresholds(clean, t))
    assert det.threshold == normal_isf(1 / 40_000)


def test_warmup_spikes_leave_a_day3_spike_found_on_seeded_series():
    flagged = 0
    medians = []
    for seed in range(10):
        t, _, x, at = warmup_spikes(100 + seed)
        flagged += (at, "spike") in feed(SeasonalZScore(), x, t)
        medians.append(np.median(day3_thresholds(x, t)))
    assert flagged == 10
    assert np.median(medians) < 1.2 * normal_isf(1 / 40_000)


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


NEW_KEYS = ("evidence", "mgf", "up_sum", "up_len", "down_sum", "down_len", "tokens", "last_spike")


@pytest.mark.parametrize("df", [None, 3])
@pytest.mark.parametrize("with_band", [True, False])
def test_older_states_load_and_keep_their_heavy_tail_verdict(df, with_band):
    # States written before the heavy-tail evidence, the CUSUM calibration and the change-point
    # level (with "q_band", the rate of clip < |z| <= 2 clip, or before it without): a heavy
    # tail they had recognised (both rates over twice normal; the rate beyond clip stands in for
    # a missing q_band) stays recognised, a normal one normal; the CUSUM keeps its threshold.
    rng = np.random.default_rng(10)
    t, x = seasonal_series(rng, 4, df=df)
    det = SeasonalZScore()
    feed(det, x, t)
    state = json.loads(json.dumps(det.to_state()))
    for key in NEW_KEYS:
        del state[key]
    if with_band:
        state["q_band"] = 0.9 * state["q"]
    old = SeasonalZScore.from_state(state)
    new_state = old.to_state()
    assert {k: v for k, v in new_state.items() if k not in NEW_KEYS} == {
        k: v for k, v in state.items() if k != "q_band"
    }
    assert (new_state["up_sum"], new_state["up_len"], new_state["down_len"]) == (0.0, 0, 0)
    assert old.cusum_threshold == cusum_threshold(40_000, 1.0)
    heavy = old.threshold > normal_isf(1 / 40_000)
    assert heavy == (df is not None)
    assert heavy == (det.threshold > normal_isf(1 / 40_000))
    old.update(float(x[-1]), float(t[-1]) + STEP)
    assert SeasonalZScore.from_state(old.to_state()).to_state() == old.to_state()


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


class PlainSeasonalZScore(SeasonalZScore):
    """The update as first written (method calls, builtin min/max, properties): the reference
    the flat, local-variable update must reproduce bit for bit."""

    def update(self, x, t):
        x = float(x)
        t = float(t)
        if not (math.isfinite(x) and math.isfinite(t)):
            raise ValueError("x and t must be finite")
        if self._t0 is None:
            self._t0 = t
            self._level = x
        self._n += 1
        n = self._n
        nb = self.season_bins
        if nb:
            pos = (t % self.period_s) / self.period_s * nb - 0.5
            fl = math.floor(pos)
            w = pos - fl
            b0 = int(fl) % nb
            b1 = (b0 + 1) % nb
            seas = (1.0 - w) * self._season[b0] + w * self._season[b1]
        else:
            seas = w = 0.0
            b0 = b1 = 0
        r = x - self._level - seas
        pred = self._phi * self._prev
        e = r - pred
        sigma = math.sqrt(self._var)
        if sigma < self.min_scale and n > 10:
            sigma = self.min_scale
        clip = self.clip
        if sigma > 0.0:
            z = e / sigma
            zc = z if -clip <= z <= clip else math.copysign(clip, z)
        else:
            z = zc = 0.0
        self._z = z
        armed = t - self._t0 >= self.warmup_s and sigma > 0.0
        threshold = self.threshold
        spike = armed and abs(z) > threshold
        censored = False
        if spike:
            censored = (
                threshold == self._z_normal and n - self._last_spike >= 48 and self._tokens >= 1.0
            )
            self._last_spike = n
        self.n_censored = getattr(self, "n_censored", 0) + censored
        # Warmup: nothing is flagged, but an outlier beyond the threshold does not echo.
        outlier = not armed and sigma > 0.0 and abs(z) > clip and abs(z) > threshold
        shifted = suspicious = False
        if armed:
            h = self.cusum_threshold
            self._up = max(0.0, self._up + zc - self._k)
            self._down = max(0.0, self._down - zc - self._k)
            # Each CUSUM's run since it last left 0.
            self._up_sum, self._up_len = (
                (self._up_sum + r, self._up_len + 1) if self._up else (0.0, 0)
            )
            self._down_sum, self._down_len = (
                (self._down_sum + r, self._down_len + 1) if self._down else (0.0, 0)
            )
            if self._up > h or self._down > h:
                shifted = True
                if self._up > h:
                    self._level += self._up_sum / self._up_len
                else:
                    self._level += self._down_sum / self._down_len
                self._prev = 0.0
                self._up = self._down = 0.0
                self._up_sum = self._down_sum = 0.0
                self._up_len = self._down_len = 0
            suspicious = max(self._up, self._down) > 0.5 * h
        if not (shifted or suspicious):
            self._plain_learn(n, e, pred, zc, sigma, w, b0, b1, nb)
            if not (spike or outlier):
                self._prev = r
            if sigma > 0.0 and (censored or not spike) and t - self._t0 >= 0.5 * self.warmup_s:
                az = abs(z)
                exceed = az > clip
                self._n_tail += 1
                step = max(0.001, 1.0 / self._n_tail)
                self._q += step * (exceed - self._q)
                if az <= min(1.5, clip):
                    ell = self._ev_const - 2.5 * math.log1p(self._ev_a * az * az) + 0.5 * az * az
                elif az <= clip:
                    ell = self._ev_shoulder
                elif az <= 2.0 * clip:
                    ell = self._ev_band
                else:
                    ell = 0.0
                if not censored:
                    self._evidence += step * (ell - self._evidence)
                    self._mgf += step * (
                        math.exp(2.0 * self._k * zc - 2.0 * self._k * self._k) - self._mgf
                    )
                    self._tokens = min(self._tokens + 0.007, 1.5)
                else:
                    self._tokens -= 1.0
                    self._evidence += step * (ell - self._evidence)
                if exceed:
                    self._n_exceed += 1
                    step = max(0.02, 1.0 / (self._n_exceed + 3.0))
                    winsor = math.log(100.0)
                    consistency = 1.0 / (1.0 - math.exp(-winsor))
                    y = min(math.log(az / clip), winsor * self._hill) * consistency
                    self._hill += step * (y - self._hill)
        elif suspicious:
            self._prev = pred + (zc * sigma)
        if spike:
            self._n_spikes += 1
        if shifted:
            self._n_level_shifts += 1
        if spike or shifted:
            if not self._in_alarm:
                self._kind = "level_shift" if shifted else "spike"
            elif shifted:
                self._kind = "level_shift"
            self._calm = 0
            self._set_level(True)
        elif self._in_alarm:
            self._calm += 1
            self._set_level(self._calm < self.clear_after)
        else:
            self._set_level(False)

    def _plain_learn(self, n, e, pred, zc, sigma, w, b0, b1, nb):
        clip = self.clip
        started = sigma > 0.0 and n > 10
        e_clean = zc * sigma if started else e
        r_clean = pred + e_clean
        rate = max(self.scale_rate, 1.0 / n)
        if started:
            floor = max(self._var, self.min_scale * self.min_scale)
            self._var += rate * (min(e * e, clip * clip * floor) / self._kappa - self._var)
        else:
            self._var += rate * (e * e - self._var)
        self._c0 += rate * (r_clean * r_clean - self._c0)
        self._c1 += rate * (r_clean * self._prev - self._c1)
        if self._c0 > 0.0:
            self._phi = min(0.95, max(0.0, self._c1 / self._c0))
        level_step = max(self.level_rate, 1.0 / n)
        self._level += level_step * r_clean
        if nb:
            rest = (1.0 - level_step) * r_clean
            for b, wb in ((b0, 1.0 - w), (b1, w)):
                if wb > 0.0:
                    self._visits[b] += wb
                    g = max(self.season_rate * wb, wb / self._visits[b])
                    self._season[b] += g * rest
        self._prev = r_clean


@pytest.mark.parametrize(
    ("kw", "phi", "df"),
    [
        ({}, 0.5, None),
        ({}, 0.0, 3),  # heavy tail: the Pareto spike threshold
        ({"season_bins": 0}, 0.8, None),
        ({"season_bins": 2, "clip": 2.0, "shift": 1.0, "clear_after": 3}, 0.3, None),
        ({"period_s": 3600.0, "season_bins": 7, "level_rate": 0.1, "scale_rate": 0.05}, 0.5, 2),
        ({"warmup_s": 0.0, "expected_run_length": 100.0}, 0.9, None),
    ],
)
def test_update_is_the_plain_update_bit_for_bit(kw, phi, df):
    rng = np.random.default_rng(8)
    t, x = seasonal_series(rng, 4, phi=phi, df=df)
    t = t + 12_345.0  # not aligned on the knots
    spikes = rng.choice(np.arange(2 * DAY + 10, 4 * DAY), size=6, replace=False)  # after warmup
    x[spikes] += rng.choice([-1, 1], size=6) * rng.uniform(10, 40, size=6)
    x[int(3.5 * DAY) :] += 8.0
    fast, plain = SeasonalZScore(**kw), PlainSeasonalZScore(**kw)
    heavy = calibrated = False
    for i, (xi, ti) in enumerate(zip(x.tolist(), t.tolist(), strict=True)):
        fast.update(xi, ti)
        plain.update(xi, ti)
        assert fast.to_state() == plain.to_state(), i
        assert fast.to_dict() == plain.to_dict(), i
        heavy |= plain.threshold > plain._z_normal
        calibrated |= plain.cusum_threshold > plain._h
        if i == 600:  # and after a state round trip
            fast = SeasonalZScore.from_state(json.loads(json.dumps(fast.to_state())))
    assert plain.n_alarms > 0
    if df is None:  # spikes under the normal threshold: censored tail observations
        assert plain.n_censored > 0
    if df is not None:  # the Pareto threshold and the CUSUM calibration were exercised
        assert heavy and calibrated


def test_sparse_counts_with_min_scale_are_the_plain_update_bit_for_bit():
    rng = np.random.default_rng(9)
    t = np.arange(4 * DAY) * STEP
    x = rng.poisson(0.05, t.size).astype(float)
    x[3 * DAY] = 6.0
    fast, plain = SeasonalZScore(min_scale=1.0), PlainSeasonalZScore(min_scale=1.0)
    for xi, ti in zip(x.tolist(), t.tolist(), strict=True):
        fast.update(xi, ti)
        plain.update(xi, ti)
        assert fast.to_state() == plain.to_state()


@pytest.mark.parametrize("name", ["season", "visits"])
def test_a_state_with_season_lists_of_another_length_is_refused(name):
    # One number per season bin: a state with the list cut (emptied here) restored, and the
    # next update raised IndexError (out of the evaluate stage, at every record).
    det = SeasonalZScore(season_bins=24)
    for i in range(30):
        det.update(float(i % 5), 3600.0 * i)
    state = json.loads(json.dumps(det.to_state()))
    state[name] = []
    with pytest.raises(ValueError, match=name):
        SeasonalZScore.from_state(state)
