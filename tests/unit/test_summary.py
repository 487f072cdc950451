"""Summary and LogHistogram: merge laws, accuracy against numpy, precision, state round trip."""

from __future__ import annotations

import itertools
import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from armguard.detectors.summary import LogHistogram, Summary

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)


def _fold_one_by_one(values, **kw) -> Summary:
    s = Summary(**kw)
    for v in values:
        s.update(v)
    return s


def _assert_same(a: Summary, b: Summary, values) -> None:
    assert a.count == b.count == len(values)
    assert a.histogram.to_state() == b.histogram.to_state()  # bucket counts are exact
    assert a.min == b.min and a.max == b.max
    scale = max(1.0, float(np.max(np.abs(values)))) if len(values) else 1.0
    assert a.mean == pytest.approx(b.mean, rel=1e-9, abs=1e-12 * scale)
    assert a.m2 == pytest.approx(b.m2, rel=1e-7, abs=1e-9 * scale * scale)
    assert a.sum == pytest.approx(b.sum, rel=1e-9, abs=1e-9 * scale * max(1, len(values)))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(finite, min_size=0, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_merge_in_any_grouping_and_order_equals_folding(values, cuts, order):
    bounds = sorted({0, len(values), *[c for c in cuts if c <= len(values)]})
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        part = Summary()
        part.update_many(np.array(values[lo:hi]))
        parts.append(part)
    order.shuffle(parts)
    # merge as a random binary tree
    while len(parts) > 1:
        i = order.randrange(len(parts) - 1)
        a, b = parts[i], parts[i + 1]
        parts[i : i + 2] = [a.merge(b) if order.random() < 0.5 else b.merge(a)]
    merged = parts[0] if parts else Summary()
    _assert_same(merged, _fold_one_by_one(values), values)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=80), max_bins=st.integers(16, 40))
def test_collapsing_commutes_with_merging(values, max_bins):
    # With few bins the collapse kicks in; grouping must not matter for the counts.
    whole = Summary(max_bins=max_bins)
    whole.update_many(np.array(values))
    half = len(values) // 2
    a, b = Summary(max_bins=max_bins), Summary(max_bins=max_bins)
    a.update_many(np.array(values[:half]))
    b.update_many(np.array(values[half:]))
    assert b.merge(a).histogram.to_state() == whole.histogram.to_state()
    assert whole.histogram.count == len(values)
    assert len(whole.histogram.to_state()["p"][1]) <= max_bins


def test_merge_leaves_operands_unchanged_and_merge_in_mutates():
    rng = np.random.default_rng(1)
    a, b = Summary.from_values(rng.normal(size=100)), Summary.from_values(rng.normal(size=50))
    sa, sb = a.to_state(), b.to_state()
    m = a.merge(b)
    assert a.to_state() == sa and b.to_state() == sb and m.count == 150
    a.merge_in(b)
    assert a.to_state() == m.to_state() and b.to_state() == sb


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(positive, min_size=1, max_size=200),
    q=st.floats(0.0, 1.0),
    accuracy=st.sampled_from([0.005, 0.01, 0.05]),
)
def test_quantile_within_relative_accuracy_of_numpy(values, q, accuracy):
    # enough bins that nothing collapses (the guarantee holds outside collapsed buckets)
    s = Summary.from_values(np.array(values), relative_accuracy=accuracy, max_bins=8192)
    truth = float(np.quantile(np.array(values), q, method="lower"))
    assert abs(s.quantile(q) - truth) <= accuracy * abs(truth) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.one_of(positive, positive.map(lambda v: -v), st.just(0.0)), min_size=1),
    q=st.floats(0.0, 1.0),
)
def test_quantile_with_mixed_signs_and_zeros(values, q):
    h = LogHistogram(relative_accuracy=0.01, max_bins=8192)
    h.update_many(np.array(values))
    truth = float(np.quantile(np.array(values), q, method="lower"))
    est = h.quantile(q)
    if abs(truth) < np.finfo(float).tiny:
        assert est == 0.0
    else:
        assert abs(est - truth) <= 0.01 * abs(truth) * (1 + 1e-9)


def test_quantiles_on_a_large_lognormal_sample():
    rng = np.random.default_rng(7)
    x = rng.lognormal(3.0, 1.5, size=200_000)
    s = Summary()
    for chunk in np.array_split(x, 97):
        s.update_many(chunk)
    for q in (0.001, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999):
        truth = np.quantile(x, q, method="lower")
        assert abs(s.quantile(q) - truth) <= 0.01 * truth
    assert s.quantile(0.0) == x.min() and s.quantile(1.0) == x.max()


def test_cdf_brackets_the_true_share_at_bucket_resolution():
    rng = np.random.default_rng(3)
    x = rng.lognormal(0.0, 1.0, size=50_000)
    s = Summary.from_values(x)
    g = s.histogram.gamma
    for t in (0.05, 0.3, 1.0, 2.5, 10.0):
        est = s.cdf(t)
        assert np.mean(x <= t) - 1e-12 <= est <= np.mean(x <= t * g) + 1e-12
    assert s.cdf(x.min() - 1.0) == 0.0 and s.cdf(x.max()) == 1.0
    # negative values and zero
    y = np.array([-5.0, -1.0, 0.0, 0.0, 2.0, 7.0])
    h = LogHistogram()
    h.update_many(y)
    assert h.cdf(-3.0) == pytest.approx(1 / 6)
    assert h.cdf(0.0) == pytest.approx(4 / 6)
    assert h.cdf(-10.0) == 0.0 and h.cdf(100.0) == 1.0


def test_moments_match_numpy_at_each_step():
    rng = np.random.default_rng(11)
    s = Summary()
    seen = np.zeros(0)
    for size in (1, 2, 7, 100, 1000, 3):
        batch = rng.normal(5.0, 2.0, size=size)
        s.update_many(batch)
        seen = np.concatenate([seen, batch])
        assert s.count == seen.size
        assert s.mean == pytest.approx(seen.mean(), rel=1e-12)
        assert s.sum == pytest.approx(seen.sum(), rel=1e-12)
        expected_var = seen.var(ddof=1) if seen.size > 1 else 0.0
        assert s.variance == pytest.approx(expected_var, rel=1e-10)
        assert s.min == seen.min() and s.max == seen.max()


def test_large_offset_values_keep_precision():
    rng = np.random.default_rng(5)
    noise = rng.normal(0.0, 1.0, size=100_000)
    x = 1e9 + noise
    parts = [Summary.from_values(c) for c in np.array_split(x, 333)]
    s = Summary()
    for p in parts:
        s.merge_in(p)
    # the variance of the noise, not of the rounding: naive sum-of-squares would be garbage here
    assert s.variance == pytest.approx(np.var(noise, ddof=1), rel=1e-6)
    assert s.mean - 1e9 == pytest.approx(noise.mean(), abs=1e-6)
    one = _fold_one_by_one(x[:2000])
    assert one.variance == pytest.approx(np.var(noise[:2000], ddof=1), rel=1e-6)


def test_binary_sum_is_exact():
    rng = np.random.default_rng(2)
    x = (rng.random(100_001) < 0.001).astype(float)
    s = Summary()
    for chunk in np.array_split(x, 1000):
        s.update_many(chunk)
    assert s.sum == float(x.sum()) and s.sum.is_integer()
    assert s.histogram.bins()[2].tolist() == [int((x == 0).sum()), int((x == 1).sum())]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite, max_size=50), accuracy=st.sampled_from([0.001, 0.01, 0.02]))
def test_state_round_trips_exactly_through_orjson(values, accuracy):
    s = Summary.from_values(np.array(values), relative_accuracy=accuracy)
    state = s.to_state()
    back = Summary.from_state(orjson.loads(orjson.dumps(state)))
    assert back.to_state() == state
    assert back == s
    # equal behaviour afterwards
    extra = np.array([1.5, -2.0, 0.0, 1e6])
    back.update_many(extra)
    s.update_many(extra)
    assert back.to_state() == s.to_state()
    if values:
        assert back.quantile(0.5) == s.quantile(0.5)


def test_state_is_compact():
    rng = np.random.default_rng(0)
    s = Summary.from_values(rng.lognormal(0, 1, size=100_000))
    assert len(orjson.dumps(s.to_state())) < 3000


def test_bins_edges_are_bit_identical_across_histograms():
    a, b = LogHistogram(), LogHistogram()
    a.update_many(np.array([0.5, 1.0, 3.0, -2.0, 0.0]))
    b.update_many(np.array([3.0, 100.0, -2.0]))
    la, ua, ca = a.bins()
    _lb, ub, _cb = b.bins()
    assert np.all(np.diff(ua) > 0) and np.all(la <= ua)
    assert la[np.flatnonzero(ca)].tolist()[0] < 0
    common = np.intersect1d(ua, ub)
    assert set(common.tolist()) == {float(ua[0]), float(ua[-1])}  # -2.0 and 3.0 buckets
    zero = np.flatnonzero((la == 0.0) & (ua == 0.0))
    assert ca[zero].tolist() == [1]
    assert ca.dtype == np.int64 and la.dtype == np.float64
    empty = LogHistogram().bins()
    assert [e.size for e in empty] == [0, 0, 0]


def test_empty_summary():
    s = Summary()
    assert (s.count, s.sum, s.mean, s.variance, s.m2, s.min, s.max) == (
        0,
        0.0,
        0.0,
        0.0,
        0.0,
        None,
        None,
    )
    assert s.quantile(0.5) is None and s.cdf(1.0) == 0.0
    s.update_many(np.array([]))
    assert s.count == 0
    assert Summary.from_state(s.to_state()) == s


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    s = Summary()
    with pytest.raises(ValueError, match="finite"):
        s.update_many(np.array([1.0, bad]))
    assert s.count == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"relative_accuracy": 0.0}, "relative_accuracy"),
        ({"relative_accuracy": 1.0}, "relative_accuracy"),
        ({"max_bins": 4}, "max_bins"),
    ],
)
def test_invalid_parameters_name_the_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Summary(**kwargs)


def test_merge_requires_same_accuracy():
    with pytest.raises(ValueError, match="relative_accuracy"):
        Summary(relative_accuracy=0.01).merge(Summary(relative_accuracy=0.02))


# -- state encoding: dense or sparse per store ---------------------------------------------------

# Values in a few adjacent buckets (dense wins) or spread over many (sparse wins), either sign.
clustered = st.lists(st.floats(100.0, 104.0), min_size=1, max_size=40)
spread = st.lists(st.floats(1e-3, 1e6), min_size=1, max_size=12)
signed = st.tuples(st.one_of(clustered, spread), st.one_of(clustered, spread, st.just([]))).map(
    lambda pn: pn[0] + [-x for x in pn[1]]
)


def _is_sparse(store) -> bool:
    return isinstance(store[0], list)


def _dense(store) -> list:
    """A store state in the dense ``[offset, counts]`` form every version-1 writer used."""
    if not _is_sparse(store):
        return store
    keys, counts = store
    out = [0] * (keys[-1] - keys[0] + 1)
    for k, c in zip(keys, counts, strict=True):
        out[k - keys[0]] = c
    return [keys[0], out]


def _old_format(state: dict) -> dict:
    h = state["h"]
    return {**state, "h": {**h, "p": _dense(h["p"]), "n": _dense(h["n"])}}


def _encoding_is_the_smaller(store) -> bool:
    first, counts = store
    if not counts:
        return store == [0, []]
    dense = _dense(store)
    numbers_sparse, numbers_dense = 2 * len([c for c in dense[1] if c]), 1 + len(dense[1])
    if _is_sparse(store):
        keys = first
        ascending = all(b > a for a, b in itertools.pairwise(keys))
        return ascending and all(counts) and numbers_sparse < numbers_dense
    return counts[0] > 0 and counts[-1] > 0 and numbers_dense <= numbers_sparse


@settings(max_examples=150, deadline=None)
@given(values=signed, extra=signed, accuracy=st.sampled_from([0.001, 0.01, 0.05]))
def test_state_chooses_the_smaller_encoding_and_round_trips_in_both(values, extra, accuracy):
    s = Summary.from_values(np.array(values), relative_accuracy=accuracy)
    state = s.to_state()
    for store in (state["h"]["p"], state["h"]["n"]):
        assert _encoding_is_the_smaller(store)
    back = Summary.from_state(orjson.loads(orjson.dumps(state)))
    assert back == s and back.to_state() == state
    assert back.histogram.bins()[2].tolist() == s.histogram.bins()[2].tolist()
    # equal behaviour afterwards: same updates, same states, same readings
    back.update_many(np.array(extra))
    s.update_many(np.array(extra))
    assert back.to_state() == s.to_state()
    for q in (0.01, 0.5, 0.99):
        assert back.quantile(q) == s.quantile(q)
    assert back.cdf(101.0) == s.cdf(101.0)


@settings(max_examples=150, deadline=None)
@given(a=signed, b=signed, max_bins=st.sampled_from([16, 2048]))
def test_merge_of_decoded_states_equals_merge_of_originals(a, b, max_bins):
    sa = Summary.from_values(np.array(a), max_bins=max_bins)
    sb = Summary.from_values(np.array(b), max_bins=max_bins)
    want = sa.merge(sb)
    for conv in (lambda st_: st_, _old_format):  # as written now, and as older writers did
        da = Summary.from_state(orjson.loads(orjson.dumps(conv(sa.to_state()))))
        db = Summary.from_state(orjson.loads(orjson.dumps(conv(sb.to_state()))))
        assert da.merge(db) == want and db.merge(da).histogram == want.histogram
        da.merge_in(db)
        assert da.to_state() == want.to_state()


def test_both_encodings_occur_and_old_dense_states_still_read():
    # 6 latencies spread over 82 buckets: sparse; 1,000 values over a few buckets: dense
    small = Summary.from_values(np.array([80.0, 95.0, 120.0, 150.0, 240.0, 410.0]))
    big = Summary.from_values(np.random.default_rng(42).normal(100.0, 1.0, size=1000))
    assert _is_sparse(small.to_state()["h"]["p"]) and not _is_sparse(big.to_state()["h"]["p"])
    old = _old_format(small.to_state())
    assert len(old["h"]["p"][1]) > 80
    assert 2 * len(orjson.dumps(small.to_state()["h"])) < len(orjson.dumps(old["h"]))
    back = Summary.from_state(old)
    assert back == small and back.to_state() == small.to_state()
    # a state written by the dense-only encoder before sparse stores existed
    legacy = {
        "v": 1,
        "n": 3,
        "sum": 6.0,
        "mean": 2.0,
        "m2": 2.0,
        "min": -1.0,
        "max": 4.0,
        "h": {"ra": 0.01, "mb": 2048, "p": [35, [1] + [0] * 34 + [1]], "n": [0, [1]], "z": 0},
    }
    s = Summary.from_state(legacy)
    assert s.histogram.bins()[2].tolist() == [1, 1, 1] and s.quantile(0.5) == pytest.approx(
        2.0, rel=0.01
    )
    assert s.to_state()["h"]["p"] == [[35, 70], [1, 1]]


@pytest.mark.parametrize(
    ("store", "match"),
    [
        ([[3, 2], [1, 1]], "strictly ascending"),
        ([[2, 2], [1, 1]], "strictly ascending"),
        ([[1, 2, 3], [1, 1]], "as many keys as counts"),
        ([[], []], "as many keys as counts"),
        ([[0, 5000], [1, 1]], "spans 5001 keys, more than 2048"),
    ],
)
def test_malformed_sparse_stores_are_rejected(store, match):
    state = Summary().to_state()
    state["h"]["p"] = store
    with pytest.raises(ValueError, match=match):
        Summary.from_state(state)


def _state_of(values=(1.0, 2.0, 2.5, 40.0)):
    return orjson.loads(orjson.dumps(Summary.from_values(np.asarray(values)).to_state()))


def _set(state, path, value):
    target = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return state


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        # Counts: integers in [0, 2**46) only (a negative one divided by zero later, a huge
        # one overflowed the sums). numpy converts the list, so a float is truncated as
        # before (and then fails the count check below if that changed the total).
        (("h", "p", 1, 0), -1, "integers in \\[0, 2\\*\\*46\\)"),
        (("h", "p", 1, 0), 2**46, "integers in \\[0, 2\\*\\*46\\)"),
        (("h", "p", 1), [2**63], "counts must be a list of integers"),
        (("h", "p", 1, 0), 10**30, "counts must be a list of integers"),
        (("h", "p", 1, 0), "x", "counts must be a list of integers"),
        (("h", "p", 1, 0), None, "counts must be a list of integers"),
        (("h", "p", 1), [[1], [2]], "list of at most 2048 integers"),
        (("h", "p", 1), [1, [2]], "counts must be a list of integers"),
        (("h", "p", 1), [1] * 2049, "at most 2048"),
        # Keys: those of finite values only (a huge one made a detector allocate its span).
        (("h", "p", 0), 2**64, "integer key"),
        (("h", "p", 0), 10**6, "integer key"),
        (("h", "p", 0), 1.0, "integer key"),
        (("h", "p"), [[0, 10**6], [1, 1]], "beyond those of finite values"),
        (("h", "p"), [[-(2**70), 0], [1, 1]], "keys must be a list of integers"),
        (("h", "mb"), 2**20, "at most 65536"),
        (("h", "z"), -1, "zero count"),
        (("h", "z"), 0.5, "zero count"),
        # The count is what the histogram holds; the moments are finite.
        (("n",), 5, "count must be the integer its histogram holds \\(4\\)"),
        (("n",), 4.0, "count must be the integer"),
        (("sum",), math.inf, "must be finite"),
        (("mean",), math.nan, "must be finite"),
        (("m2",), -1.0, "m2 >= 0"),
        (("min",), 100.0, "min <= max"),
        (("max",), None, "min <= max"),
    ],
)
def test_malformed_states_are_refused_with_the_reason(path, value, match):
    state = _set(_state_of(), path, value)
    with pytest.raises(ValueError, match=match):
        Summary.from_state(state)


def test_the_bounds_admit_every_state_this_code_writes():
    # Extremes: the largest and smallest finite magnitudes, both signs and zero, at the
    # finest and coarsest accuracies, and counts near the bound.
    tiny, huge = np.finfo(np.float64).tiny, np.finfo(np.float64).max
    for ra in (1e-6, 0.01, 0.5):
        for x in (tiny, huge, -tiny, -huge, 0.0, 1.0, -1.0, 5e-324):
            s = Summary.from_values(np.array([x]), relative_accuracy=ra, max_bins=1 << 16)
            back = Summary.from_state(orjson.loads(orjson.dumps(s.to_state())))
            assert back.to_state() == s.to_state()
    big = _state_of((3.0,))
    big["h"]["p"][1] = [2**46 - 1]
    big["n"] = 2**46 - 1
    assert Summary.from_state(big).count == 2**46 - 1
    empty = Summary().to_state()
    assert Summary.from_state(empty).count == 0
