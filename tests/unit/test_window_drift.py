"""WindowDrift by bucket key (LogHistograms of one accuracy) against its edge path and direct
recomputation: same merged bins, same distances, same alarms, exact states."""

import copy
import json

import numpy as np
import pytest

from armguard.detectors import Summary, WindowDrift
from armguard.detectors.histogram_distance import DISTANCES, histogram_distances


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
@pytest.mark.parametrize("kind", ["lognormal", "signs", "moving"])
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
