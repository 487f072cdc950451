import copy
import hashlib
import json
import math
import pickle

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


# -- the sliding window and the fast checks ------------------------------------------------


def calibration_stream(rng, steps, n_bins=10):
    """Seeded intervals: a calibrated model, an over-predicting spell, empty intervals, bins
    holding only predictions of exactly 0 or 1, and sizes from 0 to 5,000 labels."""
    for t in range(steps):
        m = int(rng.choice([0, 3, 40, 300, 5000]))
        p = rng.beta(2, 5, m) if t % 17 else rng.choice([0.0, 1.0, 0.95], m)
        truth = p * (0.8 if (t // 60) % 3 == 2 else 1.0)
        counts, psum, ysum = bin_predictions(p, rng.random(m) < truth, n_bins=n_bins)
        # numpy arrays (int counts) and plain lists, as callers pass either
        yield (counts, psum, ysum) if t % 2 else tuple(np.asarray(v) for v in (counts, psum, ysum))


def reference_results(window, threshold, clear_fraction, state):
    """The statistics straight from their definition, on np.sum of the window (scipy p-values),
    and the edge-triggered alarm; ``state`` carries (in_alarm,) between calls."""
    n, e, o = np.sum(np.asarray(window, dtype=float), axis=0)
    count = n.sum()
    if count == 0:
        return None
    nz = n > 0
    v = np.zeros_like(e)
    v[nz] = e[nz] * (1 - e[nz] / n[nz])
    ok = v > 0
    k = int(ok.sum())
    p = 1.0
    if k:
        hl = np.sum((o[ok] - e[ok]) ** 2 / v[ok])
        z = (o.sum() - e.sum()) / math.sqrt(v[ok].sum())
        p = min(1.0, 2 * min(stats.chi2.sf(hl, k), 2 * stats.norm.sf(abs(z))))
    score = 300.0 if p <= 0 else min(300.0, -math.log10(p))
    level = score > threshold or (state[0] and score > clear_fraction * threshold)
    alarm = level and not state[0]
    state[0] = level
    return {
        "count": round(count),
        "ece": np.abs(e - o).sum() / count,
        "bias": (e.sum() - o.sum()) / count,
        "p_value": p,
        "alarm": alarm,
        "in_alarm": level,
    }


@pytest.mark.parametrize("window_intervals", [1, 2, 5, 12])
def test_running_window_matches_the_definition_at_every_step(window_intervals):
    # The window is kept as two blocks of partial sums (no full re-sum per update): at every
    # step the statistics equal the definition on np.sum of the last intervals, the alarms are
    # the same, and the window totals are exact where the inputs are integers.
    rng = np.random.default_rng(20 + window_intervals)
    det = CalibrationDrift(expected_run_length=1000, window_intervals=window_intervals)
    recent, state, alarms = [], [False], 0
    for counts, psum, ysum in calibration_stream(rng, 700):
        det.update(counts, psum, ysum)
        recent = [*recent, [list(counts), list(psum), list(ysum)]][-window_intervals:]
        expect = reference_results(recent, det.threshold, det.clear_fraction, state)
        if expect is None:
            continue
        assert det.count == expect["count"]
        assert det.ece == pytest.approx(expect["ece"], rel=1e-12, abs=1e-15)
        assert det.bias == pytest.approx(expect["bias"], abs=1e-13)
        assert det.p_value == pytest.approx(expect["p_value"], rel=1e-9, abs=1e-300)
        assert (det.alarm, det.in_alarm) == (expect["alarm"], expect["in_alarm"])
        alarms += det.alarm
        if window_intervals > 1:
            totals = det._window_sums()
            exact = np.sum(np.asarray(recent, dtype=float), axis=0)
            assert totals[0].tolist() == exact[0].tolist()  # counts: integers, exact
            assert totals[2].tolist() == exact[2].tolist()  # outcomes: integers, exact
            assert totals[1] == pytest.approx(exact[1], rel=1e-14, abs=0)
    assert alarms > 0  # the stream does trip it


def test_two_blocks_hold_the_sums_of_their_rows():
    rng = np.random.default_rng(30)
    det = CalibrationDrift(window_intervals=5)
    for step, batch in enumerate(calibration_stream(rng, 40)):
        det.update(*batch)
        window = det._rows[det._start : det._end]
        back = det._back
        for j in range(back):  # from each older row to the block's end
            s = det._suffix[len(det._suffix) - back + j]
            assert s == pytest.approx(window[j:back].sum(axis=0), rel=1e-15, abs=0), step
        assert det._front == pytest.approx(window[back:].sum(axis=0), rel=1e-15, abs=0)


def two_block_sums(state):
    """The window's sums straight from the stored intervals and where the blocks split: the
    older block summed from its last row back, ``r_0 + (r_1 + (... + r_b))``, plus the newer
    block summed oldest first, ``((0 + r_b+1) + ...) + r_last``, with numpy on each row."""
    rows = [np.asarray(row, dtype=float) for row in state["window"]]
    back = len(rows) - state["front"]
    older = np.zeros_like(rows[0])
    if back:
        older = rows[back - 1]
        for row in reversed(rows[: back - 1]):
            older = row + older
    front = np.zeros_like(rows[0])
    for row in rows[back:]:
        front = front + row
    return older + front


@pytest.mark.parametrize("window_intervals", [2, 3, 7, 12])
def test_window_sums_equal_a_reference_over_the_stored_intervals(window_intervals):
    # At every step of a seeded stream (with round trips through JSON along the way), the
    # window sums the detector evaluates are bit for bit those of the stored intervals added
    # in the two blocks' order, within 1e-14 of np.sum over them (exact for the integer
    # counts and outcomes), and its statistics and alarms those of the reference definition.
    rng = np.random.default_rng(60 + window_intervals)
    det = CalibrationDrift(expected_run_length=500, window_intervals=window_intervals)
    recent, level, alarms = [], [False], 0
    for step, batch in enumerate(calibration_stream(rng, 400)):
        det.update(*batch)
        recent = [*recent, [list(col) for col in batch]][-window_intervals:]
        state = det.to_state()
        assert state["window"] == [[[float(v) for v in col] for col in row] for row in recent]
        sums = det._window_sums()
        assert np.array_equal(sums, two_block_sums(state)), step
        plain = np.sum(np.asarray(recent, dtype=float), axis=0)
        assert sums[0].tolist() == plain[0].tolist()
        assert sums[2].tolist() == plain[2].tolist()
        assert sums[1] == pytest.approx(plain[1], rel=1e-14, abs=0)
        expect = reference_results(recent, det.threshold, det.clear_fraction, level)
        if expect is not None:
            assert det.count == expect["count"]
            assert det.ece == pytest.approx(expect["ece"], rel=1e-12, abs=1e-15)
            assert det.p_value == pytest.approx(expect["p_value"], rel=1e-9, abs=1e-300)
            assert (det.alarm, det.in_alarm) == (expect["alarm"], expect["in_alarm"])
            alarms += det.alarm
        if step % 37 == 5:
            det = CalibrationDrift.from_state(json.loads(json.dumps(state, allow_nan=False)))
            assert det.to_state() == state
    assert alarms > 0


@pytest.mark.parametrize("window_intervals", [1, 3, 4])
@pytest.mark.parametrize("cut", [0, 1, 3, 4, 5, 7, 8, 9])
def test_state_round_trip_at_any_point_of_the_blocks(window_intervals, cut):
    rng = np.random.default_rng(40)
    batches = list(calibration_stream(rng, 30))
    a = CalibrationDrift(expected_run_length=100, window_intervals=window_intervals)
    for b in batches[:cut]:
        a.update(*b)
    twin = CalibrationDrift.from_state(json.loads(json.dumps(a.to_state(), allow_nan=False)))
    assert twin.to_state() == a.to_state()
    for b in batches[cut:]:
        a.update(*b)
        twin.update(*b)
        assert twin.to_dict() == a.to_dict()  # bit for bit
        assert twin.to_state() == a.to_state()


# A state written before the window was kept as two blocks (no "front"), and the results the
# code of that time gave on the next five intervals.
OLD_STATE = {
    "params": {
        "expected_run_length": 100.0,
        "n_bins": 4,
        "window_intervals": 3,
        "clear_fraction": 0.5,
    },
    "window": [
        [
            [97.0, 109.0, 112.0, 82.0],
            [14.835782498493726, 41.3689973995707, 70.149805063635, 69.42953289760442],
            [8.0, 40.0, 76.0, 72.0],
        ],
        [
            [94.0, 111.0, 109.0, 86.0],
            [13.668361133995406, 41.45096828706635, 67.97149016162732, 72.03317896495426],
            [14.0, 38.0, 74.0, 75.0],
        ],
        [
            [87.0, 115.0, 110.0, 88.0],
            [13.394433854536555, 44.20668257032575, 69.40143189149934, 74.89082544868714],
            [10.0, 56.0, 74.0, 81.0],
        ],
    ],
    "ece": 0.03749638733504618,
    "bias": -0.020998758190003363,
    "p_value": 0.05482977608279096,
    "count": 1200,
    "alarm": False,
    "in_alarm": False,
    "n_alarms": 0,
}
OLD_NEXT = [
    [
        [71, 119, 115, 95],
        [11.05950231417095, 44.03529049022019, 71.5132799650765, 81.26894592487602],
        [7.0, 41.0, 66.0, 83.0],
    ],
    [
        [81, 129, 103, 87],
        [12.784108818348818, 48.914154887472456, 64.85948368840486, 75.27022785022702],
        [10.0, 42.0, 52.0, 59.0],
    ],
    [
        [99, 114, 101, 86],
        [15.016997288643102, 42.23794076009582, 62.65716408740321, 73.39562703162115],
        [12.0, 38.0, 48.0, 60.0],
    ],
    [
        [79, 132, 106, 83],
        [11.555317074107666, 49.049758870095324, 66.86805335436948, 70.16468346173973],
        [7.0, 46.0, 62.0, 60.0],
    ],
    [
        [85, 109, 122, 84],
        [13.218216728541142, 40.474426728953446, 76.44261913884534, 72.2509474993825],
        [15.0, 29.0, 70.0, 58.0],
    ],
]
OLD_RESULTS = [
    (False, False, 1200, 0.4581053867329704),
    (False, False, 1200, 0.08408776816356436),
    (True, True, 1200, 1.4077704443311371e-08),
    (False, True, 1200, 4.743698292285719e-14),
    (False, True, 1200, 9.119207824267731e-12),
]


def test_states_written_before_the_two_blocks_still_load():
    det = CalibrationDrift.from_state(json.loads(json.dumps(OLD_STATE)))
    assert det.to_state()["front"] == 3  # the old window is one block, summed oldest first
    for batch, (alarm, in_alarm, count, p_value) in zip(OLD_NEXT, OLD_RESULTS, strict=True):
        det.update(*batch)
        assert (det.alarm, det.in_alarm, det.count) == (alarm, in_alarm, count)
        assert det.p_value == pytest.approx(p_value, rel=1e-12)


@pytest.mark.parametrize("window_intervals", [1, 3])
@pytest.mark.parametrize(
    ("counts", "psum", "ysum", "match"),
    [
        ([1, 1], [0.5, float("nan")], [0, 0], "finite"),
        ([1, float("inf")], [0.5, 0.5], [0, 0], "finite"),
        ([1e308, 1e308], [0.5, 0.5], [0, 0], "finite"),  # the total overflows
        ([1, 1], [-0.5, 0.5], [0, 0], "finite"),
        ([1, -1], [0.5, 0.0], [0, 0], "finite"),
        ([1, 0], [0.5, 0.5], [0, 0], "exceed"),  # an empty bin with a prediction sum
        ([1, 1], [0.5, 0.5], [0, 2], "exceed"),
        ([1, 1, 1], [0.5, 0.5, 0.5], [0, 0, 0], "n_bins=2"),
    ],
)
def test_rejected_input_is_named_and_leaves_the_detector_as_it_was(
    window_intervals, counts, psum, ysum, match
):
    det = CalibrationDrift(n_bins=2, window_intervals=window_intervals)
    for _ in range(window_intervals):  # a full window: the next update starts a new block
        det.update([10, 10], [2.0, 7.0], [3, 6])
    before = det.to_state()
    with pytest.raises(ValueError, match=match):
        det.update(counts, psum, ysum)
    with pytest.raises(ValueError, match=match):
        det.update(*(np.asarray(v, dtype=float) for v in (counts, psum, ysum)))
    assert det.to_state() == before
    det.update([10, 10], [2.0, 7.0], [3, 6])
    assert det.to_state()["window"][-1] == [[10.0, 10.0], [2.0, 7.0], [3.0, 6.0]]


def test_chi2_sf_int_is_chi2_sf():
    from armguard.detectors._calibration import chi2_sf, chi2_sf_int

    for k in range(1, 201):
        for x in [0.0, -1.0, *np.geomspace(1e-6, 1500, 40).tolist()]:
            assert chi2_sf_int(x, k) == chi2_sf(x, k)


def test_chi2_sf_int_tables_are_the_loop_bit_for_bit():
    # chi2_sf_int takes its term divisors from tables for k <= 200 and computes them in the
    # loop (`_chi2_sf_int_loop`, the form it had) beyond: the same operations, the same bits.
    from armguard.detectors._calibration import _chi2_sf_int_loop, chi2_sf_int

    rng = np.random.default_rng(70)
    edges = [0.0, -1.0, 5e-324, 1e-300, 1e-6, 1e4, 1e308, math.inf]
    for k in [*range(-2, 206), 399, 400, 1000]:
        for x in [*edges, *(rng.random(60) * 3 * max(k, 1)).tolist()]:
            assert chi2_sf_int(x, k) == _chi2_sf_int_loop(x, k), (x, k)


def test_inconsistent_states_are_refused():
    state = json.loads(json.dumps(OLD_STATE))
    with pytest.raises(ValueError, match="front"):
        CalibrationDrift.from_state({**state, "front": 4})
    with pytest.raises(ValueError, match="window_intervals=2"):
        CalibrationDrift.from_state({**state, "params": {**state["params"], "window_intervals": 2}})
    # update() relies on the rows it checked on the way in: a state cannot bring others
    for col, value in [(0, -1.0), (1, -0.5), (2, 1e9), (1, float("nan")), (0, float("inf"))]:
        window = json.loads(json.dumps(state["window"]))
        window[1][col][2] = value
        with pytest.raises(ValueError, match="window intervals must be finite"):
            CalibrationDrift.from_state({**state, "window": window})


# -- results pinned bit for bit across cost work ----------------------------------------------


def pinned_stream(rng, steps, n_bins):
    """Seeded intervals from rng.random/integers only (streams numpy keeps stable): labelled
    predictions as numpy arrays or lists, raw float intervals with non-integer counts, empty
    bins and signed zeros, and every 7th interval a refused one (NaN, outcomes above counts,
    an overflowing total, a negative sum)."""
    for t in range(steps):
        kind = t % 7
        if kind == 3:
            c, e, o = [5.0] * n_bins, [1.0] * n_bins, [1.0] * n_bins
            bad = t % 4
            if bad == 0:
                e[t % n_bins] = float("nan")
            elif bad == 1:
                o[t % n_bins] = 6.0
            elif bad == 2:
                c = [1e308] * n_bins
            else:
                e[0] = -0.5
            yield c, e, o
        elif kind == 5:
            c = rng.random(n_bins) * rng.integers(0, 3, n_bins) * 50.0
            e = c * rng.random(n_bins)
            o = c * rng.random(n_bins)
            z = rng.random(n_bins) < 0.3
            c[z], e[z], o[z] = 0.0, -0.0, 0.0 if t % 2 else -0.0
            yield (c, e, o) if t % 3 else (c.tolist(), e.tolist(), o.tolist())
        else:
            m = int(rng.choice([0, 3, 40, 300, 5000]))
            u = rng.random(m)
            p = u * u if t % 17 else np.where(u < 0.4, 0.0, np.where(u < 0.8, 1.0, 0.95))
            truth = p * (0.8 if (t // 60) % 3 == 2 else 1.0)
            batch = bin_predictions(p, rng.random(m) < truth, n_bins=n_bins)
            yield batch if t % 2 else tuple(np.asarray(v) for v in batch)


# Digests of the stream below computed with the code of 2f17f42 (before the cost work of
# issue 4): every statistic, alarm, state and error message since is the same, bit for bit.
PINNED = [
    (1, 10, 1, "b7b1ddb13659057e"),
    (2, 10, 2, "49c483947a8950fc"),
    (3, 4, 3, "9e5d19d817e0f4f1"),
    (5, 10, 5, "9d08cb6f85175414"),
    (12, 10, 12, "82e47014fcfe47af"),
    (13, 3, 13, "d836400734d3bf26"),
]


@pytest.mark.parametrize(("window_intervals", "n_bins", "seed", "expect"), PINNED)
def test_results_are_those_of_the_pinned_code_bit_for_bit(window_intervals, n_bins, seed, expect):
    # to_state(), to_dict() and the error of every update of a seeded stream, hashed; every
    # 23rd step the detector is replaced by one restored from its JSON state, so states the
    # pinned code wrote (equal to these, bit for bit) load and go on alike.
    rng = np.random.default_rng(seed)
    det = CalibrationDrift(
        expected_run_length=200, n_bins=n_bins, window_intervals=window_intervals
    )
    digest = hashlib.sha256()
    alarms = errors = 0
    for step, batch in enumerate(pinned_stream(rng, 300, n_bins)):
        try:
            det.update(*batch)
            error = None
        except ValueError as exc:
            error = str(exc)
            errors += 1
        alarms += det.alarm
        digest.update(json.dumps([error, det.to_state(), det.to_dict()], allow_nan=False).encode())
        if step % 23 == 11:
            det = CalibrationDrift.from_state(json.loads(json.dumps(det.to_state())))
    assert digest.hexdigest()[:16] == expect
    assert alarms > 0 and errors == 43


# -- update_many: the batch is update() one by one, bit for bit --------------------------------


def exact(det):
    """Everything a detector reports and stores, as JSON text: float reprs are exact, and
    unlike == they tell -0.0 from 0.0."""
    props = [det.ece, det.bias, det.p_value, det.count, det.score, det.alarm, det.in_alarm]
    return json.dumps([det.to_state(), det.to_dict(), props, det.n_alarms], allow_nan=False)


def refusal(interval, n_bins):
    """The error update() raises for ``interval`` on its own (None if it takes it)."""
    try:
        CalibrationDrift(n_bins=n_bins, window_intervals=1).update(*interval)
    except ValueError as exc:
        return str(exc)
    return None


def as_batch_input(rng, intervals):
    """The batch's three inputs: (K, n_bins) float arrays, or lists of the intervals' own
    rows (lists, int or float arrays) as callers may pass them."""
    if rng.random() < 0.5:
        return [np.array([np.asarray(iv[j], dtype=float) for iv in intervals]) for j in range(3)]
    return [[iv[j] for iv in intervals] for j in range(3)]


@pytest.fixture
def vectorised(monkeypatch):
    """update_many takes its vectorised pass however small the batch."""
    from armguard.detectors import calibration_drift

    monkeypatch.setattr(calibration_drift, "_SMALL", 0)


@pytest.mark.parametrize(
    ("n_bins", "seed", "small"), [(10, 1, 0), (4, 2, 0), (1, 3, 0), (10, 4, 32), (3, 5, 32)]
)
def test_update_many_is_update_one_by_one_bit_for_bit(monkeypatch, n_bins, seed, small):
    # Detectors of mixed windows (1 to 12, so buffers roll over and blocks switch at
    # different steps), run lengths and clear fractions, each fed its own pinned stream
    # (calibrated and over-predicting spells, raw float intervals, empty bins, signed zeros,
    # refused intervals). Each step is a batch (random detectors, repeats included, in random
    # order, 1 to 50 rows, or 32 or more distinct ones: with small=32, the default, batches
    # and runs of distinct detectors under 32 rows go through update() one by one after the
    # checks, so there only the distinct ones are vectorised), a single update() of one
    # detector, or a detector replaced by one restored from its JSON state; its twin gets the
    # same intervals through update() one by one. Everything they report and store is
    # compared exactly after every step.
    from armguard.detectors import calibration_drift

    monkeypatch.setattr(calibration_drift, "_SMALL", small)
    rng = np.random.default_rng(90 + seed)
    windows = [1, 2, 3, 5, 12, 12, 4] * 5
    dets = [
        CalibrationDrift(
            expected_run_length=[50.0, 200.0, 10_000.0][i % 3],
            n_bins=n_bins,
            window_intervals=w,
            clear_fraction=[0.5, 1.0, 0.0][i % 3],
        )
        for i, w in enumerate(windows)
    ]
    twins = [CalibrationDrift.from_state(d.to_state()) for d in dets]
    streams = [
        pinned_stream(np.random.default_rng(1000 * seed + i), 10**6, n_bins)
        for i in range(len(dets))
    ]
    seen = {"repeats": 0, "refused": 0, "singles": 0, "restored": 0, "vectorised": 0}
    updates = [0] * len(dets)
    for _step in range(90):
        action = rng.random()
        if action < 0.1:
            i = int(rng.integers(len(dets)))
            dets[i] = CalibrationDrift.from_state(json.loads(json.dumps(dets[i].to_state())))
            seen["restored"] += 1
        elif action < 0.25:
            i = int(rng.integers(len(dets)))
            interval = next(streams[i])
            if refusal(interval, n_bins) is None:
                dets[i].update(*interval)
                twins[i].update(*interval)
                updates[i] += 1
                seen["singles"] += 1
        else:
            if rng.random() < 0.25:
                size = int(rng.integers(32, len(dets) + 1))
                idx = rng.permutation(len(dets))[:size].tolist()
            else:
                idx = rng.integers(0, len(dets), size=int(rng.integers(1, 51))).tolist()
            seen["repeats"] += len(idx) > len(set(idx))
            intervals = [next(streams[i]) for i in idx]
            errors = [refusal(iv, n_bins) for iv in intervals]
            if any(errors):
                # refused: the first refused row is named and no detector changes
                j = next(j for j, err in enumerate(errors) if err)
                before = [exact(d) for d in dets]
                with pytest.raises(ValueError) as info:
                    CalibrationDrift.update_many(
                        [dets[i] for i in idx], *as_batch_input(rng, intervals)
                    )
                assert str(info.value) == f"row {j}: {errors[j]}"
                assert [exact(d) for d in dets] == before
                seen["refused"] += 1
                keep = [k for k, err in enumerate(errors) if err is None]
                idx = [idx[k] for k in keep]
                intervals = [intervals[k] for k in keep]
            CalibrationDrift.update_many([dets[i] for i in idx], *as_batch_input(rng, intervals))
            seen["vectorised"] += len(idx) >= small and len(set(idx)) == len(idx)
            for i, interval in zip(idx, intervals, strict=True):
                twins[i].update(*interval)
                updates[i] += 1
        for det, twin in zip(dets, twins, strict=True):
            assert exact(det) == exact(twin), _step
    assert min(seen.values()) > 0, seen
    assert sum(t.n_alarms for t in twins) > 0
    assert min(updates) > 25  # every buffer has rolled over (2 x 12 slots at most)


@pytest.mark.usefixtures("vectorised")
def test_update_many_results_do_not_depend_on_the_batch():
    # One detector's updates, alone and inside batches of other detectors' updates.
    rng = np.random.default_rng(95)
    alone = CalibrationDrift(expected_run_length=100, window_intervals=3)
    batched = CalibrationDrift(expected_run_length=100, window_intervals=3)
    others = [CalibrationDrift(window_intervals=w) for w in (1, 2, 12)]
    own = calibration_stream(rng, 80)
    noise = calibration_stream(np.random.default_rng(96), 10**6)
    for interval in own:
        CalibrationDrift.update_many([alone], *([row] for row in interval))
        rest = [next(noise) for _ in others]
        dets = [*others, batched]
        CalibrationDrift.update_many(dets, *([iv[j] for iv in [*rest, interval]] for j in range(3)))
        assert exact(alone) == exact(batched)
    assert alone.n_alarms > 0


@pytest.mark.usefixtures("vectorised")
def test_update_many_hypothesis_small_batches():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    count = st.sampled_from([0.0, 1.0, 3.0, 1e-3, 5e-324, 7.5, 1e12, 1e300])
    share = st.sampled_from([0.0, -0.0, 1.0, 0.5, 0.1, 1 / 3, 0.999])
    cell = st.tuples(count, share, share)
    interval = st.lists(cell, min_size=3, max_size=3)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(
        windows=st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=3),
        batches=st.lists(
            st.lists(st.tuples(st.integers(0, 2), interval), min_size=1, max_size=5),
            min_size=1,
            max_size=8,
        ),
    )
    def check(windows, batches):
        dets = [CalibrationDrift(n_bins=3, window_intervals=w) for w in windows]
        twins = [CalibrationDrift.from_state(d.to_state()) for d in dets]
        for batch in batches:
            picks = [
                (i % len(dets), [[c, c * a, c * b] for c, a, b in cells]) for i, cells in batch
            ]
            rows = [np.array(cells).T for _, cells in picks]  # (3, n_bins): n, e, o
            CalibrationDrift.update_many(
                [dets[i] for i, _ in picks], *(np.array([r[j] for r in rows]) for j in range(3))
            )
            for (i, _), r in zip(picks, rows, strict=True):
                twins[i].update(*r)
            assert [exact(d) for d in dets] == [exact(t) for t in twins]

    check()


@pytest.mark.usefixtures("vectorised")
def test_update_many_feeds_from_state_and_update():
    # A detector updated in batches writes states that load and go on alike, singly or batched.
    rng = np.random.default_rng(97)
    batches = list(calibration_stream(rng, 60))
    det = CalibrationDrift(expected_run_length=100, window_intervals=5)
    for b in batches[:33]:
        CalibrationDrift.update_many([det], *([col] for col in b))
    single = CalibrationDrift.from_state(json.loads(json.dumps(det.to_state())))
    batched = CalibrationDrift.from_state(json.loads(json.dumps(det.to_state())))
    assert exact(single) == exact(det)
    for b in batches[33:]:
        det.update(*b)
        single.update(*b)
        CalibrationDrift.update_many([batched], *([col] for col in b))
        assert exact(single) == exact(det) == exact(batched)


@pytest.mark.parametrize(
    ("counts", "psum", "ysum", "match"),
    [
        ([1, 1], [0.5, float("nan")], [0, 0], "finite"),
        ([1, float("inf")], [0.5, 0.5], [0, 0], "finite"),
        ([1e308, 1e308], [0.5, 0.5], [0, 0], "finite"),  # the interval's total overflows
        ([1, 1], [-0.5, 0.5], [0, 0], "finite"),
        ([1, -1], [0.5, 0.0], [0, 0], "finite"),
        ([1, 0], [0.5, 0.5], [0, 0], "exceed"),
        ([1, 1], [0.5, 0.5], [0, 2], "exceed"),
    ],
)
@pytest.mark.parametrize("small", [0, 32])
def test_update_many_refuses_a_bad_row_and_changes_nothing(
    monkeypatch, counts, psum, ysum, match, small
):
    from armguard.detectors import calibration_drift

    monkeypatch.setattr(calibration_drift, "_SMALL", small)
    dets = [CalibrationDrift(n_bins=2, window_intervals=w) for w in (1, 3, 3)]
    for _ in range(3):  # full windows: the next update starts a new block
        for det in dets:
            det.update([10, 10], [2.0, 7.0], [3, 6])
    before = [exact(d) for d in dets]
    good = ([10, 10], [2.0, 7.0], [3, 6])
    # the bad row last, after a detector listed twice: still nothing changes
    batch = [dets[0], dets[1], dets[1], dets[2]]
    rows = [good, good, good, (counts, psum, ysum)]
    with pytest.raises(ValueError, match=rf"^row 3: .*{match}"):
        CalibrationDrift.update_many(batch, *([r[j] for r in rows] for j in range(3)))
    assert [exact(d) for d in dets] == before
    with pytest.raises(ValueError, match=rf"^row 0: .*{match}"):
        CalibrationDrift.update_many(dets[:1], [counts], [psum], [ysum])
    assert [exact(d) for d in dets] == before


def test_an_overflowing_window_total_is_refused_singly_and_in_batches(monkeypatch):
    # Each interval's count is finite but the window's is not: update() refuses it (it used
    # to raise OverflowError after moving the window); a batch refuses the same row. (numpy
    # warns of the overflow in the window's sums that update() then refuses.)
    from armguard.detectors import calibration_drift

    det = CalibrationDrift(n_bins=1, window_intervals=2)
    det.update([1e308], [0.0], [0.0])
    before = exact(det)
    with (
        pytest.raises(ValueError, match="window's total count overflows"),
        np.errstate(over="ignore"),
    ):
        det.update([1e308], [0.0], [0.0])
    assert exact(det) == before
    for small, applied in [(0, 0), (32, 1)]:
        # vectorised: refused before any change; a small batch (update() row by row): the
        # rows before it applied (documented)
        monkeypatch.setattr(calibration_drift, "_SMALL", small)
        other = CalibrationDrift(n_bins=1, window_intervals=2)
        with pytest.raises(ValueError, match=r"^row 1: .*window's total count overflows"):
            with np.errstate(over="ignore"):
                CalibrationDrift.update_many(
                    [other, det], [[1.0], [1e308]], [[0.5], [0.0]], [[1.0], [0]]
                )
        assert exact(det) == before and other.count == applied
    # vectorised, this check is made per run of distinct detectors: the run before a
    # detector's second update is applied (documented)
    monkeypatch.setattr(calibration_drift, "_SMALL", 0)
    other = CalibrationDrift(n_bins=1, window_intervals=2)
    with pytest.raises(ValueError, match=r"^row 2: "):
        CalibrationDrift.update_many(
            [other, other, det], [[1.0], [1.0], [1e308]], [[0.5]] * 3, [[1.0]] * 3
        )
    assert other.count == 1 and exact(det) == before


@pytest.mark.parametrize("small", [0, 32])
def test_update_many_refuses_inputs_of_the_wrong_shape(monkeypatch, small):
    from armguard.detectors import calibration_drift

    monkeypatch.setattr(calibration_drift, "_SMALL", small)
    dets = [CalibrationDrift(n_bins=2), CalibrationDrift(n_bins=2, window_intervals=1)]
    before = [exact(d) for d in dets]
    good = [[1, 1], [1, 1]]
    for bad in ([[1, 1]], [[1, 1, 1], [1, 1, 1]], [[1, 1], [1]], [1, 1], [["a", "b"], [1, 1]]):
        with pytest.raises(ValueError, match=r"counts must be a \(len\(detectors\), n_bins\)"):
            CalibrationDrift.update_many(dets, bad, good, good)
        with pytest.raises(ValueError, match=r"outcome_sums must be a \(len"):
            CalibrationDrift.update_many(dets, good, good, bad)
    with pytest.raises(ValueError, match="once per n_bins"):
        CalibrationDrift.update_many([*dets, CalibrationDrift(n_bins=3)], good, good, good)
    with pytest.raises(ValueError, match="CalibrationDrift instances"):
        CalibrationDrift.update_many([dets[0], object()], good, good, good)
    with pytest.raises(ValueError, match="one row per detector"):
        CalibrationDrift.update_many([], [[1, 1]], [], [])
    CalibrationDrift.update_many([], [], [], [])
    assert [exact(d) for d in dets] == before


def test_vectorised_chi2_sf_int_is_the_scalar_one_bit_for_bit():
    from armguard.detectors._calibration import chi2_sf_int
    from armguard.detectors.calibration_drift import _chi2_sf_int_many

    rng = np.random.default_rng(98)
    ks = np.arange(1, 251)
    edges = [0.0, -1.0, 5e-324, 1e-300, 1e-6, 0.5, 1e4, 1e308, math.inf]
    x = np.concatenate([np.repeat(edges, ks.size), rng.random(ks.size * 8) * 3 * 251])
    k = np.concatenate([np.tile(ks, len(edges)), rng.integers(1, 251, ks.size * 8)])
    with np.errstate(all="ignore"):
        got = _chi2_sf_int_many(x, k).tolist()
    expect = [chi2_sf_int(xi, ki) for xi, ki in zip(x.tolist(), k.tolist(), strict=True)]
    assert [v.hex() for v in got] == [v.hex() for v in expect]


def cpython_sum(values):
    """CPython 3.12's sum() of floats from int 0 (Neumaier's compensated sum), in Python."""
    f, c = 0.0 + values[0], 0.0
    for x in values[1:]:
        t = f + x
        c += (f - t) + x if abs(f) >= abs(x) else (x - t) + f
        f = t
    return f + c if c and math.isfinite(c) else f


@pytest.mark.parametrize("compensated", [False, True])
def test_bin_sums_are_those_of_update(monkeypatch, compensated):
    # The first rows as this interpreter's sum() adds (plain before 3.12, Neumaier's after:
    # both forms checked, whichever runs here), the others as ``gap += ...`` does.
    from armguard.detectors import calibration_drift

    native = calibration_drift._COMPENSATED_SUM
    monkeypatch.setattr(calibration_drift, "_COMPENSATED_SUM", compensated)
    rng = np.random.default_rng(99)
    cols = rng.choice([0.0, -0.0, 1.0, 1e-16, 1e100, 3.3, 1e308, 7e307], size=(4, 6, 200))
    cols *= rng.choice([1.0, 1.0, 1.0, -1.0], size=cols.shape)
    cols[:, :, :3] = -0.0  # sum() starts from int 0: 0 + -0.0 is 0.0
    with np.errstate(all="ignore"):
        got = calibration_drift._sequential_sums(cols, 2)
    for r in range(4):
        for i in range(cols.shape[2]):
            values = cols[r, :, i].tolist()
            if r < 2 and compensated:
                expect = cpython_sum(values)
            else:
                expect = 0.0
                for v in values:
                    expect += v
            assert got[r, i].hex() == expect.hex() or (math.isnan(expect) and math.isnan(got[r, i]))
    if compensated == native:
        # and this interpreter's own sum() is the form it uses
        for i in range(cols.shape[2]):
            s = sum(cols[0, :, i].tolist())
            assert got[0, i].hex() == s.hex() or (math.isnan(s) and math.isnan(got[0, i]))


def test_stacked_is_np_array_for_any_layout():
    # update_many joins the bytes of the detectors' (C-contiguous) window sums; anything
    # else falls back to np.array.
    from armguard.detectors.calibration_drift import _stacked

    rng = np.random.default_rng(100)
    contiguous = [rng.random((3, 4)) for _ in range(5)]
    strided = [*contiguous[:2], rng.random((3, 8))[:, ::2], rng.random((6, 4))[::2], contiguous[4]]
    for arrays in (contiguous, strided):
        got = _stacked(arrays, (5, 3, 4))
        assert got.shape == (5, 3, 4) and np.array_equal(got, np.array(arrays))


@pytest.mark.parametrize("window_intervals", [1, 3, 12])
def test_copies_and_pickles_are_detectors_of_their_own_that_go_on_alike(
    monkeypatch, window_intervals
):
    # A detector holds numpy views of its own arrays (the window's rows, the slots, the older
    # block's sums, the check's result over a bytearray). copy.deepcopy and pickle used to copy
    # each view as an array of its own: the copy then wrote new intervals where its window no
    # longer read them and took input update() refuses, silently; copy.copy shared the arrays
    # with the original. Each copy must go on as the original does, singly and in batches,
    # refuse what it refuses, and leave the original alone.
    from armguard.detectors import calibration_drift

    monkeypatch.setattr(calibration_drift, "_SMALL", 0)  # the batch's vectorised pass
    rng = np.random.default_rng(101)
    batches = list(calibration_stream(rng, 200))  # over-predicting from 120
    det = CalibrationDrift(expected_run_length=100, window_intervals=window_intervals)
    for b in batches[: window_intervals + 2]:  # inside a block, the buffer partly used
        det.update(*b)
    copies = [copy.deepcopy(det), copy.copy(det), pickle.loads(pickle.dumps(det))]
    batched = copy.deepcopy([det, det])[0]
    for c in copies:
        assert type(c) is CalibrationDrift and exact(c) == exact(det)
    for b in batches[window_intervals + 2 :]:
        det.update(*b)
        for c in copies:
            c.update(*b)
        CalibrationDrift.update_many([batched], *([col] for col in b))
        assert [exact(c) for c in [*copies, batched]] == [exact(det)] * 4
    assert det.n_alarms > 0
    before = exact(det)
    for c in [*copies, batched]:
        with pytest.raises(ValueError, match="exceed"):
            c.update([1] * 10, [2.0] * 10, [0] * 10)
        c.update(*batches[0])
    assert exact(det) == before


def test_short_runs_of_a_batch_with_repeats_go_through_update(monkeypatch):
    # A detector listed twice cuts the batch into runs of distinct detectors. A run under 32
    # rows used to take the vectorised pass all the same (~100 us of numpy calls a run: a
    # batch ordered by detector, one run a row, cost ~9x update() one by one); such runs go
    # through update() as small batches do, with the same results. Only runs of 32 rows or
    # more are vectorised.
    from armguard.detectors import calibration_drift

    passes = []
    vectorised = calibration_drift._update_run

    def recorded(dets, rows, offset):
        passes.append(len(dets))
        vectorised(dets, rows, offset)

    monkeypatch.setattr(calibration_drift, "_update_run", recorded)
    rng = np.random.default_rng(102)
    dets = [CalibrationDrift(expected_run_length=100, window_intervals=w) for w in range(1, 41)]
    twins = [CalibrationDrift.from_state(d.to_state()) for d in dets]
    stream = calibration_stream(rng, 10**6)
    orders = [
        list(range(40)),  # distinct: one run of 40
        [0, 1] * 20,  # twenty runs of 2
        [*range(35), *range(35)],  # two runs of 35
        sorted([*range(20), *range(20)]),  # ordered by detector: runs of 1 and 2
        [*range(33), 0, 1, 2],  # a run of 33, then one of 3
    ]
    for order in orders * 4:
        intervals = [next(stream) for _ in order]
        CalibrationDrift.update_many(
            [dets[i] for i in order], *([iv[j] for iv in intervals] for j in range(3))
        )
        for i, interval in zip(order, intervals, strict=True):
            twins[i].update(*interval)
        assert [exact(d) for d in dets] == [exact(t) for t in twins]
    assert sorted(set(passes)) == [33, 35, 40]
    assert sum(t.n_alarms for t in twins) > 0
    # an overflowing window total in a short run: named, the rows before it applied
    a, b = (CalibrationDrift(n_bins=1, window_intervals=2) for _ in range(2))
    a.update([1e308], [0.0], [0.0])
    before = exact(a)
    with pytest.raises(ValueError, match=r"^row 1: .*window's total count overflows"):
        with np.errstate(over="ignore"):
            CalibrationDrift.update_many(
                [b, a, *[b] * 32], [[1.0], [1e308], *[[1.0]] * 32], [[0.5]] * 34, [[1.0]] * 34
            )
    assert exact(a) == before and b.count == 1
