"""WindowDrift by bucket key (LogHistograms of one accuracy) against its edge path and direct
recomputation: same merged bins, same distances, same alarms, exact states."""

import base64
import copy
import hashlib
import json

import numpy as np
import pytest

from armguard.detectors import Summary, WindowDrift
from armguard.detectors.histogram_distance import DISTANCES, histogram_distances
from armguard.detectors.window_drift import _decode_counts, _encode_counts


def stream(kind, seed, n_intervals=70):
    """Seeded interval Summaries: lognormal, with negatives and zeros, or moving up in scale."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_intervals):
        n = 0 if i % 23 == 22 else int(rng.choice([40, 300, 300, 900]))
        if kind == "lognormal":
            values = rng.lognormal(0.4 if i > 40 else 0.0, 1.0, n)
        elif kind == "signs":
            values = rng.normal(0.3 if i > 40 else 0.0, 1.0, n)
            values[rng.random(n) < 0.1] = 0.0
        elif kind == "zeros":  # positive, some zeros; a negative value in a few intervals
            values = rng.lognormal(0.4 if i > 40 else 0.0, 1.0, n)
            values[rng.random(n) < 0.1] = 0.0
            if i % 11 == 5 and n:
                values[0] = -1.0
        else:  # "moving": the window leaves the reference's keys behind
            values = rng.lognormal(0.2 * i, 0.3, n) * (-1.0 if i % 9 == 4 else 1.0)
        out.append(Summary.from_values(values))
    return out


def result(det):
    return (det.alarm, det.in_alarm, det.n_alarms, det.ready, det.score, det.threshold)


def restored(det):
    state = json.loads(json.dumps(det.to_state()))
    new = WindowDrift.from_state(state)
    assert new.to_state() == state
    return new


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("kind", ["lognormal", "signs", "zeros", "moving"])
def test_keyed_equals_edges_and_direct_recomputation(kind, distance):
    # The same intervals as Summaries (by key) and as bins tuples (the edge path): identical
    # scores, thresholds, alarms and distances at every update, through the reference phase,
    # the sliding window, restores mid-stream and a new reference; each evaluation also equals
    # the distances of the merged windows computed from scratch.
    parts = stream(kind, seed=len(kind) + DISTANCES.index(distance))
    params = {"reference_intervals": 6, "window_intervals": 3, "distance": distance}
    keyed = WindowDrift(expected_run_length=50.0, **params)
    edges = WindowDrift(expected_run_length=50.0, **params)
    start = 0  # first interval of the current reference
    for i, s in enumerate(parts):
        keyed.update(s)
        edges.update(s.histogram.bins())
        assert keyed._keyed and not edges._keyed
        assert result(keyed) == result(edges), i
        if i % 3 == 0:
            assert keyed.distances == edges.distances, i
        recent = parts[max(i - 2, start + 6) : i + 1]
        if keyed.ready and sum(p.count for p in recent):
            reference = Summary()
            for p in parts[start : start + 6]:
                reference.merge_in(p)
            window = Summary()
            for p in recent:
                window.merge_in(p)
            direct = histogram_distances(window, reference, alpha=1 / 50.0)
            assert keyed.score == pytest.approx(direct[distance]["corrected"], rel=1e-12, abs=1e-15)
            assert keyed.threshold == pytest.approx(direct[distance]["threshold"], rel=1e-12)
        if i in (4, 25, 60):
            keyed = restored(keyed)
            edges = restored(edges)
        if i == 45:
            keyed.reset_reference()
            edges.reset_reference()
            start = i + 1
    assert edges.n_alarms >= 1


def test_keyed_state_round_trip_and_old_edge_states():
    # A keyed state names the accuracy and holds stores; restoring it continues exactly. A
    # state of the edge format (as every state written before keys was) still loads, mid
    # reference phase or mid window, moves to keys on its first Summary (its buckets are
    # those of that accuracy) and continues with the same results.
    parts = stream("signs", seed=3)
    keyed = WindowDrift(reference_intervals=5, window_intervals=3, distance="ks")
    edges = WindowDrift(reference_intervals=5, window_intervals=3, distance="ks")
    for i, s in enumerate(parts[:50]):
        keyed.update(s)
        edges.update(s.histogram.bins())
        if i in (2, 6, 30):
            state = keyed.to_state()
            assert state["relative_accuracy"] == 0.01
            old = edges.to_state()
            assert "relative_accuracy" not in old
            from_keys = WindowDrift.from_state(json.loads(json.dumps(state)))
            from_old = WindowDrift.from_state(json.loads(json.dumps(old)))
            assert from_old.to_state() == old
            live = copy.deepcopy(keyed)
            for s2 in parts[50:]:
                for det in (live, from_keys, from_old):
                    det.update(s2)
                assert result(from_keys) == result(live)
                assert result(from_old) == result(live)
                assert from_old._keyed
                assert from_keys.to_state() == live.to_state()
    assert from_old.to_state() == live.to_state()
    fresh = WindowDrift.from_state(WindowDrift().to_state())
    fresh.update(parts[0])
    assert fresh._keyed  # an empty old-format state picks keys on its first Summary


@pytest.mark.parametrize("switch", ["tuple", "accuracy", "magnitudes"])
def test_mixed_inputs_move_to_edges_with_the_same_results(switch):
    # A bins tuple, a histogram of another accuracy, or values so far apart in magnitude that
    # a dense layout of keys would be mostly empty: the detector moves to edges for good and
    # agrees with one that was on edges all along.
    parts = stream("lognormal", seed=9, n_intervals=40)
    keyed = WindowDrift(reference_intervals=4, window_intervals=2, distance="wasserstein")
    edges = WindowDrift(reference_intervals=4, window_intervals=2, distance="wasserstein")
    for i, s in enumerate(parts):
        x = s
        if i == 15 and switch == "tuple":
            x = s.histogram.bins()
        elif i == 15 and switch == "accuracy":
            x = Summary.from_values(np.arange(1.0, 300.0), relative_accuracy=0.02)
        elif i == 15:
            x = Summary.from_values(np.r_[1e-150, 1e150, np.arange(1.0, 300.0)])
        keyed.update(x)
        edges.update(x.histogram.bins() if hasattr(x, "histogram") else x)
        assert keyed._keyed == (i < 15)
        assert result(keyed) == result(edges), i
        assert keyed.distances == edges.distances, i
    assert keyed.to_state() == edges.to_state()


def test_keyed_copies_the_stores():
    # The detector keeps copies: a Summary updated after it was passed does not reach it.
    rng = np.random.default_rng(4)
    det = WindowDrift(reference_intervals=2, window_intervals=1, distance="psi")
    twin = WindowDrift(reference_intervals=2, window_intervals=1, distance="psi")
    for _ in range(6):
        s = Summary.from_values(rng.lognormal(0, 1, 200))
        det.update(s)
        twin.update(s.copy())
        s.update_many(rng.lognormal(3, 1, 500))
        assert result(det) == result(twin)
    assert det.to_state() == twin.to_state()


def test_update_many_copies_the_stores():
    # The same in a batch, whose common step (windows complete, keys the layout holds) takes
    # the arriving counts itself: a Summary updated after the batch does not reach a detector.
    rng = np.random.default_rng(4)
    dets = [WindowDrift(reference_intervals=2, window_intervals=2) for _ in range(10)]
    twins = copy.deepcopy(dets)
    for _ in range(8):
        xs = [Summary.from_values(rng.lognormal(0, 1, 200)) for _ in dets]
        WindowDrift.update_many(dets, xs)
        WindowDrift.update_many(twins, [x.copy() for x in xs])
        for x in xs:
            x.update_many(np.full(500, 1.0))  # keys it holds: its counts change in place
        for det, twin in zip(dets, twins, strict=True):
            assert result(det) == result(twin)
            assert det.to_state() == twin.to_state()


def test_layout_of_keys_is_laid_out_afresh_when_mostly_empty():
    # The window climbs far above the reference, comes back, then falls far below it: the
    # keys it left are empty in both windows, so the layout is rebuilt around the keys held
    # (not moved to edges), with the same results as the edge path all along.
    rng = np.random.default_rng(12)
    scales = [0.0] * 4 + [30.0] * 3 + [0.0] * 3 + [-20.0] * 3
    keyed = WindowDrift(reference_intervals=2, window_intervals=2, distance="wasserstein")
    edges = WindowDrift(reference_intervals=2, window_intervals=2, distance="wasserstein")
    widths = []
    for mu in scales:
        s = Summary.from_values(rng.lognormal(mu, 0.3, 300))
        keyed.update(s)
        edges.update(s.histogram.bins())
        assert keyed._keyed
        assert result(keyed) == result(edges)
        assert keyed.distances == edges.distances
        widths.append(keyed._keys.ref.shape[0])
    assert max(widths) > 1400 and widths[-1] < max(widths)  # rebuilt, narrower


def test_old_state_on_other_edges_stays_on_edges():
    # An edge-format state whose buckets are not those of the Summaries that follow (bins of
    # another accuracy) stays on edges, with the results of a detector on edges all along.
    rng = np.random.default_rng(21)
    old = WindowDrift(reference_intervals=3, window_intervals=2, distance="js")
    edges = WindowDrift(reference_intervals=3, window_intervals=2, distance="js")
    for _ in range(6):
        s = Summary.from_values(rng.lognormal(0, 1, 300), relative_accuracy=0.02)
        old.update(s.histogram.bins())
        edges.update(s.histogram.bins())
    det = WindowDrift.from_state(json.loads(json.dumps(old.to_state())))
    for i in range(10):
        s = Summary.from_values(rng.lognormal(0.5 * (i > 4), 1, 300))
        det.update(s)
        edges.update(s.histogram.bins())
        assert not det._keyed
        assert result(det) == result(edges)
        assert det.distances == edges.distances
    assert det.to_state() == edges.to_state()


@pytest.mark.parametrize("as_tuples", [False, True])
def test_empty_intervals_then_values(as_tuples):
    # Reference and first window empty (held), then values: the window grows from nothing
    # (on edges this raised an IndexError on the empty grid).
    det = WindowDrift(reference_intervals=1, window_intervals=1)
    values = Summary.from_values(np.arange(1.0, 50.0))
    for s in (Summary(), Summary(), values, values):
        det.update(s.histogram.bins() if as_tuples else s)
        assert not det.alarm and det.score == 0.0  # the reference stays empty: no evaluation
    assert det._keyed is not as_tuples


# -- batched updates: WindowDrift.update_many -------------------------------------------------


def batch_fleet(seed, n_detectors):
    """Detectors of every distance and small windows, each with its own seeded stream."""
    rng = np.random.default_rng(seed)
    specs, streams = [], []
    for j in range(n_detectors):
        specs.append(
            WindowDrift(
                expected_run_length=float(rng.choice([20.0, 50.0, 10_000.0])),
                reference_intervals=int(rng.integers(1, 6)),
                window_intervals=int(rng.integers(1, 4)),
                distance=DISTANCES[j % 4],
                max_bins=int(rng.choice([2, 5, 20])),
                min_expected=float(rng.choice([1.0, 5.0])),
                clear_fraction=float(rng.choice([0.0, 0.5, 1.0])),
            ).to_state()
        )
        kind = ("lognormal", "signs", "zeros", "moving")[j % 4]
        streams.append(stream(kind, seed=1000 * seed + j))
    return specs, streams


@pytest.mark.parametrize("seed", [1, 2])
def test_update_many_equals_single_updates_and_does_not_depend_on_the_batch(seed):
    # Thousands of updates: every detector updated in one shuffled batch per interval, each
    # also alone in a batch of one, and a twin by update(). Same alarms at every step, scores
    # within rounding of update()'s, and batch or alone bit for bit the same state. Along the
    # way detectors are restored from their states, start a new reference, or get a bins
    # tuple (they move to edges, where update_many is update()).
    rng = np.random.default_rng(seed)
    specs, streams = batch_fleet(seed, 64)
    single = [WindowDrift.from_state(s) for s in specs]
    together = [WindowDrift.from_state(s) for s in specs]
    alone = [WindowDrift.from_state(s) for s in specs]
    evaluations = onsets = 0
    for i in range(len(streams[0])):
        inputs = [s[i] for s in streams]
        for j in rng.choice(len(specs), 3, replace=False).tolist():
            event = int(rng.integers(0, 8 if i < 60 else 3))
            if event == 0:
                single[j], together[j], alone[j] = (
                    restored(d) for d in (single[j], together[j], alone[j])
                )
            elif event == 1:
                for d in (single[j], together[j], alone[j]):
                    d.reset_reference()
            elif event == 2 and i >= 60:
                inputs[j] = inputs[j].histogram.bins()
        for det, x in zip(single, inputs, strict=True):
            det.update(x)
        order = rng.permutation(len(specs))
        WindowDrift.update_many([together[k] for k in order], [inputs[k] for k in order])
        for det, x in zip(alone, inputs, strict=True):
            WindowDrift.update_many([det], [x])
        for a, b, c in zip(single, together, alone, strict=True):
            assert result(b) == result(c)
            assert b.to_state() == c.to_state()
            assert (a.alarm, a.in_alarm, a.n_alarms, a.ready) == (
                b.alarm,
                b.in_alarm,
                b.n_alarms,
                b.ready,
            )
            assert b.score == pytest.approx(a.score, rel=1e-12, abs=1e-15)
            rel = 1e-9 if a.distance == "wasserstein" else 1e-12
            assert b.threshold == pytest.approx(a.threshold, rel=rel)
            evaluations += a.ready
            onsets += a.alarm
    assert evaluations > 3_000 and onsets > 30
    assert sum(not d._keyed for d in together) >= 1  # some moved to edges
    assert sum(bool(d._keyed) for d in together) >= 32


def test_update_many_edge_cases():
    rng = np.random.default_rng(5)
    values = Summary.from_values(np.arange(1.0, 50.0))
    # Empty reference and window: held, then values (the window grows from nothing).
    dets = [WindowDrift(reference_intervals=1, window_intervals=1, distance=d) for d in DISTANCES]
    for s in (Summary(), Summary(), values, values):
        WindowDrift.update_many(dets, [s] * len(dets))
        assert all(not d.alarm and d.score == 0.0 and d._keyed for d in dets)
    # A detector listed twice sees its updates in order, as two update() calls.
    c = [Summary.from_values(rng.normal(0, 1, 1000)) for _ in range(3)]
    moved = Summary.from_values(rng.normal(1.0, 1, 1000))
    for distance in DISTANCES:
        batched = WindowDrift(reference_intervals=2, window_intervals=1, distance=distance)
        twin = WindowDrift(reference_intervals=2, window_intervals=1, distance=distance)
        WindowDrift.update_many([batched, batched, batched], c)
        WindowDrift.update_many([batched, batched], [moved, c[0]])
        for s in [*c, moved, c[0]]:
            twin.update(s)
        assert (batched.n_alarms, batched.in_alarm) == (twin.n_alarms, twin.in_alarm) == (1, False)
    # Another accuracy, a LogHistogram, an old edge-format state, an empty batch, a mismatch.
    parts = stream("signs", seed=6, n_intervals=12)
    old = WindowDrift(reference_intervals=3, window_intervals=2, distance="ks")
    for s in parts[:6]:
        old.update(s.histogram.bins())
    state = json.loads(json.dumps(old.to_state()))
    dets = [
        WindowDrift(reference_intervals=3, window_intervals=2, distance="ks") for _ in range(3)
    ] + [WindowDrift.from_state(state)]
    twins = [copy.deepcopy(d) for d in dets]
    for s in parts[6:]:
        inputs = [
            s,
            s.histogram,
            Summary.from_values(np.arange(1.0, 300.0), relative_accuracy=0.02),
            s,
        ]
        WindowDrift.update_many(dets, inputs)
        for twin, x in zip(twins, inputs, strict=True):
            twin.update(x)
        assert [d._keyed for d in dets] == [True, True, True, True]
        for d, twin in zip(dets, twins, strict=True):
            assert result(d) == result(twin)  # KS: a maximum of exact quotients either way
    WindowDrift.update_many([], [])
    with pytest.raises(ValueError, match="one histogram per detector"):
        WindowDrift.update_many(dets, parts[:2])


@pytest.mark.parametrize("distance", DISTANCES)
def test_update_many_with_all_distances(distance):
    parts = stream("lognormal", seed=7, n_intervals=50)
    dets = [
        WindowDrift(reference_intervals=4, window_intervals=2, distance=distance) for _ in range(3)
    ]
    twin = WindowDrift(reference_intervals=4, window_intervals=2, distance=distance)
    for i, s in enumerate(parts):
        WindowDrift.update_many(
            dets, [s, s, s.histogram.bins() if i > 40 else s], all_distances=True
        )
        twin.update(s)
        if twin.ready and twin.score != 0.0 and s.count:
            want = twin.distances
            for det in dets:
                assert det.distances == pytest.approx(want, rel=1e-12, abs=1e-15)
            assert WindowDrift.from_state(dets[0].to_state()).to_dict() == dets[0].to_dict()


def test_update_many_in_chunks_equals_update():
    # More ready detectors than one chunk of the vectorised pass (256), one listed twice
    # across the chunk boundary: the same alarms as update(), scores within rounding.
    rng = np.random.default_rng(8)
    summaries = [Summary.from_values(rng.lognormal(0.3 * (i % 3), 1.0, 200)) for i in range(40)]
    dets = [
        WindowDrift(reference_intervals=1, window_intervals=1, distance="js") for _ in range(600)
    ]
    twins = copy.deepcopy(dets)
    for step in range(3):
        order = [*range(600), 5]  # detector 5 again, after the first chunks
        inputs = [summaries[(7 * i + step) % 40] for i in range(601)]
        WindowDrift.update_many([dets[i] for i in order], inputs)
        for i, x in zip(order, inputs, strict=True):
            twins[i].update(x)
        for a, b in zip(twins, dets, strict=True):
            assert (a.alarm, a.in_alarm, a.n_alarms) == (b.alarm, b.in_alarm, b.n_alarms)
            assert b.score == pytest.approx(a.score, rel=1e-12, abs=1e-15)
    assert sum(d.n_alarms for d in dets) > 50


@pytest.mark.parametrize("distance", ["psi", "ks"])
def test_update_many_one_distance_batch_equals_batches_of_one(distance):
    # A batch of one distance decides without _decide (inlined, see _evaluate_keyed): bit for
    # bit what a batch of one decides with it (PSI and KS alone: the single-pair forms equal to
    # the batch), with min_effect, hysteresis, onsets and clears; 300 detectors, one listed
    # again after the first chunk of 256 (its first update evaluated before its second).
    rng = np.random.default_rng(12)
    pool = [
        Summary.from_values(rng.lognormal(0.25 * (i % 3), 1.0, int(rng.choice([50, 300]))))
        for i in range(30)
    ]
    batched = [
        WindowDrift(
            expected_run_length=float(rng.choice([20.0, 10_000.0])),
            reference_intervals=3,
            window_intervals=2,
            distance=distance,
            min_effect=float(rng.choice([0.0, 0.05, 0.2])),
            clear_fraction=float(rng.choice([0.0, 0.5, 1.0])),
        )
        for _ in range(300)
    ]
    alone = copy.deepcopy(batched)
    clears = 0
    for step in range(14):
        was = [d.in_alarm for d in batched]
        # Early steps take the general path (windows filling), later ones the inlined step.
        order = [*range(300), 7]
        xs = [pool[(3 * j + step * (1 + j % 4)) % 30] for j in order]
        WindowDrift.update_many([batched[j] for j in order], xs)
        for j, x in zip(order, xs, strict=True):
            WindowDrift.update_many([alone[j]], [x])
        for a, b, before in zip(alone, batched, was, strict=True):
            assert result(a) == result(b)
            assert a.to_state() == b.to_state()
            clears += before and not b.in_alarm
    assert sum(d.n_alarms for d in batched) > 80 and clears > 50


# -- pinned results: the figures of the code before the batch's flat window maintenance -------

# A keyed state written before the flat window maintenance (reference 2, window 2, a zero
# bucket in the reference): it must load and go on exactly as it did.
OLD_KEYED_STATE = (
    '{"params":{"expected_run_length":10000.0,"distance":"psi","max_bins":20,'
    '"min_expected":1.0,"clear_fraction":0.5,"min_effect":0.0,"reference_intervals":2,'
    '"window_intervals":2},"reference":[[0,1,-26],[],[1,0,0,1,0,0,0,0,0,0,1,1,0,0,2,1,0,0,'
    "0,0,0,0,0,1,0,0,1,1,0,0,1,0,1,0,0,1,2,0,0,1,0,1,0,0,0,1,1,0,0,1,1,0,1,0,0,0,0,0,0,1]],"
    '"n_reference":2,"window":[[[0,0,-17],[],[1,0,0,0,0,1,1,0,0,0,0,0,0,0,0,2,0,0,0,1,0,0,0,'
    "0,0,3,0,0,0,0,0,1,0,1,0,0,0,0,0,0,0,1]],[[0,0,-20],[],[1,0,0,0,0,1,0,0,0,0,1,1,0,0,0,1,"
    '1,0,0,1,0,0,0,1,1,0,1,0,0,0,0,0,0,1,0,1]]],"distances":{"psi":-0.7794766890732138},'
    '"score":-0.7794766890732138,"threshold":2.599116205999053,"alarm":false,'
    '"in_alarm":false,"n_alarms":0,"relative_accuracy":0.01}'
)


def pinned_run(seed, batched):
    """Digest of every result (scores and thresholds as float.hex) and the final states of a
    seeded run: the mixed fleet of ``batch_fleet``, 300 detectors on positive values (more
    than one chunk of the vectorised pass, windows complete after 4 intervals) and 20 restored
    from ``OLD_KEYED_STATE``; some restored from their states, reset or given a bins tuple on
    the way, some listed twice in a batch, batches of 1 to 300."""
    rng = np.random.default_rng(seed)
    specs, streams = batch_fleet(seed, 48)
    mixed = [WindowDrift.from_state(s) for s in specs]
    pool = [Summary.from_values(rng.lognormal(0.5 * (i % 4 == 3), 1.0, 200)) for i in range(30)]
    fleet = [
        WindowDrift(reference_intervals=2, window_intervals=2, distance=DISTANCES[i % 4])
        for i in range(300)
    ]
    old = [WindowDrift.from_state(json.loads(OLD_KEYED_STATE)) for _ in range(20)]
    small = [Summary.from_values(rng.lognormal(0.0, 0.3, 12)) for _ in range(10)]
    every = mixed + fleet + old
    out = []
    for i in range(len(streams[0])):
        inputs = (
            [s[i] for s in streams]
            + [pool[(7 * j + 3 * i) % 30] for j in range(300)]
            + [small[(j + i) % 10] for j in range(20)]
        )
        for j in rng.choice(len(every), 4, replace=False).tolist():
            event = int(rng.integers(0, 6))
            if event == 0:
                every[j] = WindowDrift.from_state(json.loads(json.dumps(every[j].to_state())))
            elif event == 1:
                every[j].reset_reference()
            elif event == 2 and i >= 60:
                inputs[j] = inputs[j].histogram.bins()
        if batched:
            order = rng.permutation(len(every)).tolist()
            order += order[:3]  # three listed twice
            xs = [inputs[k] for k in order[:-3]] + [pool[i % 30]] * 3
            start = 0
            for size in (1, 5, 9, 100, 300, len(order)):
                end = start + size
                WindowDrift.update_many([every[k] for k in order[start:end]], xs[start:end])
                start = end
        else:
            for det, x in zip(every, inputs, strict=True):
                det.update(x)
        out.append([[*result(d)[:4], d.score.hex(), d.threshold.hex()] for d in every])
    out.append([counts_as_lists(d.to_state()) for d in every])
    return hashlib.sha256(json.dumps(out).encode()).hexdigest()


def counts_as_lists(state):
    """A keyed state with its packed counts as the lists of integers the states held when the
    digests below were generated (the numbers, not their encoding, are pinned)."""
    if state.get("relative_accuracy") is None:
        return state

    def listed(packed):
        return [packed[0], *(_decode_counts(c).tolist() for c in packed[1:])]

    return {
        **state,
        "reference": listed(state["reference"]),
        "window": [listed(p) for p in state["window"]],
    }


@pytest.mark.parametrize(
    "batched, digest",
    [
        (True, "746563f1f3e2977513c1a1faf58556aab1cb255470fef6cacccb644f49cf9d7d"),
        (False, "4a287a5fe82fcce03886da51ffb64fa1e1bbec0d0977ffe58422cc2be952cf02"),
    ],
)
def test_results_pinned_to_the_code_before_flat_window_maintenance(batched, digest):
    # Generated by the code of b67216e (before update_many kept the windows in one flat pass):
    # every score, threshold, alarm and state bit for bit, by update_many and by update().
    assert pinned_run(11, batched) == digest


@pytest.mark.parametrize(
    "counts, width",
    [
        ([0, 1, 255], "1"),
        ([256, 0, 3], "2"),
        ([65535], "2"),
        ([65536, 7], "4"),
        ([2**32 - 1], "4"),
        ([2**32, 0], "8"),
        ([2**63 - 1, 5], "8"),
    ],
)
def test_packed_counts_take_the_narrowest_width_and_read_back_exactly(counts, width):
    packed = _encode_counts(np.asarray(counts, dtype=np.int64))
    assert packed[0] == width
    assert len(base64.b64decode(packed[1:])) == int(width) * len(counts)
    back = _decode_counts(json.loads(json.dumps(packed)))
    assert back.dtype == np.int64 and back.tolist() == counts
    assert _encode_counts(np.zeros(0, dtype=np.int64)) == ""
    assert _decode_counts("").shape == (0,)


@pytest.mark.parametrize(
    "packed, message",
    [
        ("3AQID", "width digit"),
        ("1", "width digit"),
        ("2AQID", "width digit"),  # 3 bytes are not whole 2-byte counts
        ("1AQ!D", "not valid base64"),
        ("8" + base64.b64encode((2**63).to_bytes(8, "little")).decode(), "does not fit"),
        ([[1, 2]], "list of integers"),
        ([1, -2, 3], "list of integers"),  # a negative count (an old-format list)
    ],
)
def test_malformed_packed_counts_are_refused_with_the_reason(packed, message):
    state = WindowDrift.from_state(json.loads(OLD_KEYED_STATE)).to_state()
    state["window"][0][2] = packed
    with pytest.raises(ValueError, match=message):
        WindowDrift.from_state(state)


def test_states_with_count_lists_restore_to_the_same_detector_as_packed_ones():
    # States written before the counts were packed hold lists of integers; restored, the
    # detector is the same, its next state is packed, and both go on identically.
    old = json.loads(OLD_KEYED_STATE)
    assert isinstance(old["window"][0][2], list)
    from_old = WindowDrift.from_state(old)
    state = from_old.to_state()
    assert isinstance(state["window"][0][2], str) and isinstance(state["reference"][2], str)
    assert counts_as_lists(state) == old
    from_new = WindowDrift.from_state(json.loads(json.dumps(state)))
    rng = np.random.default_rng(77)
    for i in range(8):
        s = Summary.from_values(rng.lognormal(0.4 * (i > 3), 1.0, 200))
        from_old.update(s)
        from_new.update(s)
        assert from_old.to_state() == from_new.to_state()
        assert from_old.score.hex() == from_new.score.hex()
    assert from_old.n_alarms == from_new.n_alarms


@pytest.mark.parametrize(
    "where, value",
    [
        (("window", 0, 0, 2), 200_000),  # a positive store's first key no finite value has
        (("reference", 0, 2), -200_000),  # its first key below those of finite values
        (("reference", 0, 2), 35_500),  # its last key beyond those of finite values
        (("window", 0, 0, 1), -1),  # a negative zero-bucket count
        (("window", 0, 0, 2), 1.5),  # an offset that is not an integer
    ],
)
def test_keyed_states_with_keys_no_finite_value_has_are_refused(where, value):
    # The keyed layout spans every key from the lowest to the highest offset of the reference
    # and windows: an offset of 1e9 in a state made from_state or the next update allocate
    # gigabytes (the process was killed, at every restart of a daemon restoring it). Keys are
    # bounded as LogHistogram.from_state bounds them (55d3d7d); these allocate little.
    state = WindowDrift.from_state(json.loads(OLD_KEYED_STATE)).to_state()
    at = state
    for k in where[:-1]:
        at = at[k]
    at[where[-1]] = value
    with pytest.raises(ValueError, match=r"key|zero"):
        WindowDrift.from_state(state)  # restored, the first two raised at the next update
