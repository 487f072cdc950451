"""The pure half of ingest: decoder and data contract, the columnar accumulator, its flush."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from armguard.daemon.contract import (
    REASONS,
    Accepted,
    Contract,
    PartitionAccumulator,
    RawRecord,
    Rejected,
    Skipped,
    deadletter_headers,
    fold_all,
)
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.settings import IngestSettings
from armguard.daemon.summarise import _distinct_pairs, summarise_groups
from armguard.daemon.summary_record import arm_states
from armguard.detectors.summary import Summary

NOW = 1_764_300_000.0

EXPERIMENTS = parse_experiments(
    """
experiments:
  - id: ranker-v2
    control: control
    arms: {control: 0.5, treatment: 0.5}
    metrics:
      latency_ms: {min: 0, max: 600000}
      error: {min: 0, max: 1}
    features:
      query_length: {min: 0, max: 10000}
    guardrails:
      - {metric: latency_ms, test: mean, action: kill}
      - {metric: clicks, test: mean}
  - id: checkout
    control: baseline
    arms: {baseline: 0.5, arm-a: 0.5}
    metrics:
      revenue: {min: 0}
""",
    where="test.yaml",
)


@pytest.fixture(scope="module")
def contract() -> Contract:
    return Contract(EXPERIMENTS, IngestSettings())


def rec(**fields) -> bytes:
    base = {"experiment": "ranker-v2", "arm": "control", "ts": NOW - 1, "unit": "u1"}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not _DROP})


_DROP = object()


def test_valid_record_keeps_only_summarised_names(contract):
    got = contract.decode(
        rec(metrics={"latency_ms": 12.5, "error": 0, "other": 3}, features={"query_length": 4}),
        now=NOW,
    )
    assert got == Accepted(
        "ranker-v2", "control", NOW - 1, {"latency_ms": 12.5, "error": 0}, {"query_length": 4}
    )
    # A guardrail metric without a configured range is summarised, unbounded (up to 1e100).
    assert contract.decode(rec(metrics={"clicks": -5}), now=NOW).metrics == {"clicks": -5}
    # Metrics and features are optional; unit may be a string, an integer or absent.
    assert isinstance(contract.decode(rec(unit=7), now=NOW), Accepted)
    assert isinstance(contract.decode(rec(unit=_DROP), now=NOW), Accepted)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "no_value"),
        (b"\xff\xfe\x00", "invalid_json"),
        (b'"\xed\xa0\x80"', "invalid_json"),  # a lone surrogate is not UTF-8
        (b'{"experiment": "ranker-v2", "ts": NaN}', "invalid_json"),
        (b'{"a": Infinity}', "invalid_json"),
        (b'{"a": 1e400}', "invalid_json"),
        (b'{"a": 1} {"b": 2}', "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2, 3]", "not_object"),
        (b"null", "not_object"),
        (b'"ranker-v2"', "not_object"),
        (rec(experiment=_DROP), "missing_field"),
        (rec(arm=_DROP), "missing_field"),
        (rec(ts=_DROP), "missing_field"),
        (rec(experiment=None), "missing_field"),
        (rec(experiment=["ranker-v2"]), "wrong_type"),
        (rec(experiment={"id": 1}), "wrong_type"),
        (rec(experiment=12), "wrong_type"),
        (rec(arm=0), "wrong_type"),
        (rec(ts="2025-11-28T00:00:00Z"), "wrong_type"),
        (rec(ts=True), "wrong_type"),
        (rec(unit=[1]), "wrong_type"),
        (rec(unit=1.5), "wrong_type"),
        (rec(metrics=[1, 2]), "wrong_type"),
        (rec(features="x"), "wrong_type"),
        (rec(metrics={"latency_ms": "12"}), "wrong_type"),
        (rec(metrics={"latency_ms": True}), "wrong_type"),
        (rec(metrics={"latency_ms": None}), "wrong_type"),
        (rec(metrics={"latency_ms": {"v": 1}}), "wrong_type"),
        (rec(arm="treatment-b"), "unknown_arm"),
        (rec(ts=NOW - 86_400 - 1), "late"),
        (rec(ts=NOW + 301), "future"),
        (rec(metrics={"latency_ms": -0.5}), "out_of_range"),
        (rec(metrics={"error": 2}), "out_of_range"),
        (rec(metrics={"latency_ms": 600_000.5}), "out_of_range"),
        (rec(metrics={"clicks": 1e101}), "out_of_range"),
        (rec(features={"query_length": 10_001}), "out_of_range"),
        (rec(experiment="checkout", arm="baseline", metrics={"revenue": -1}), "out_of_range"),
    ],
)
def test_each_rejection_has_its_reason(contract, value, reason):
    got = contract.decode(value, now=NOW)
    assert isinstance(got, Rejected), got
    assert got.reason == reason
    assert got.reason in REASONS
    assert len(got.detail) <= 200


def test_freshness_bounds_are_inclusive(contract):
    assert isinstance(contract.decode(rec(ts=NOW - 86_400), now=NOW), Accepted)
    assert isinstance(contract.decode(rec(ts=NOW + 300), now=NOW), Accepted)
    assert isinstance(contract.decode(rec(ts=int(NOW)), now=NOW), Accepted)


def test_unconfigured_experiment_is_skipped_not_rejected(contract):
    assert contract.decode(rec(experiment="someone-else", arm=[]), now=NOW) == Skipped(
        "unknown_experiment", "someone-else"
    )


def test_oversized_record_is_rejected_without_parsing(contract):
    big = b'{"experiment": "ranker-v2", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    got = contract.decode(big, now=NOW)
    assert got.reason == "too_large" and "10485" in got.detail
    # Allowed in size, a 10 MB array is still only "not an object".
    roomy = Contract(EXPERIMENTS, IngestSettings(max_record_bytes=32 * 1024 * 1024))
    arr = b"[" + b",".join([b'"' + b"x" * 10_000 + b'"'] * 1_000) + b"]"
    assert roomy.decode(arr, now=NOW).reason == "not_object"


def test_nested_field_paths():
    ingest = IngestSettings(
        experiment_field="ctx.exp",
        arm_field="ctx.variant",
        ts_field="event.time",
        metrics_field="m",
        features_field="f",
        unit_field="ctx.user",
    )
    c = Contract(EXPERIMENTS, ingest)
    value = orjson.dumps(
        {
            "ctx": {"exp": "ranker-v2", "variant": "treatment", "user": "u9"},
            "event": {"time": NOW},
            "m": {"latency_ms": 3},
            "metrics": {"latency_ms": -1},  # not the configured path: ignored
        }
    )
    assert c.decode(value, now=NOW) == Accepted(
        "ranker-v2", "treatment", NOW, {"latency_ms": 3}, {}
    )
    assert c.decode(b'{"ctx": [1], "event": {"time": 1}}', now=NOW).reason == "missing_field"
    assert c.decode(b'{"ctx": {"exp": 5}}', now=NOW).reason == "wrong_type"
    with pytest.raises(ValueError, match="field path"):
        Contract(EXPERIMENTS, IngestSettings(arm_field="a..b"))


def test_a_record_is_folded_whole_or_not_at_all(contract):
    acc = PartitionAccumulator(contract, "t", 0)
    records = [
        RawRecord(0, rec(metrics={"latency_ms": 5, "error": 7}, features={"query_length": 1})),
        RawRecord(1, rec(metrics={"latency_ms": 5, "error": 1}, features={"query_length": -1})),
        RawRecord(2, rec(metrics={"latency_ms": 9, "error": 1}, features={"query_length": 2})),
    ]
    assert acc.fold(records, now=NOW) == 3
    flush = acc.drain()
    assert flush.consumed == 3 and flush.summarised == 1
    assert flush.deadlettered == {"out_of_range": 2}
    body = arm_states(orjson.loads(flush.summaries[0][1]))["control"]
    assert body["count"] == 1
    assert Summary.from_state(body["metrics"]["latency_ms"]).sum == 9
    assert Summary.from_state(body["metrics"]["error"]).count == 1
    assert Summary.from_state(body["features"]["query_length"]).max == 2


def test_fold_uses_each_records_kafka_timestamp_when_now_is_not_given(contract):
    acc = PartitionAccumulator(contract, "t", 0)
    old = rec(ts=NOW - 10 * 86_400)
    acc.fold(
        [
            RawRecord(0, old, timestamp=int((NOW - 10 * 86_400 + 5) * 1000)),  # fresh then
            RawRecord(1, old, timestamp=int(NOW * 1000)),  # late by now
        ]
    )
    flush = acc.drain()
    assert flush.summarised == 1 and flush.deadlettered == {"late": 1}


def test_offsets_already_folded_are_ignored_and_discard_rewinds(contract):
    acc = PartitionAccumulator(contract, "t", 3)
    batch = [RawRecord(o, rec(metrics={"latency_ms": o})) for o in range(10, 20)]
    assert acc.fold(batch[:6], now=NOW) == 6
    assert acc.fold(batch, now=NOW) == 4  # a re-fetch around a rebalance
    assert acc.fold(batch, now=NOW) == 0
    assert acc.next_offset == 20
    acc.discard()
    assert acc.next_offset == 10 and acc.pending == 0
    assert acc.fold(batch, now=NOW) == 10
    flush = acc.drain()
    assert (flush.first_offset, flush.last_offset, flush.commit_offset) == (10, 19, 20)
    assert acc.drain() is None


def test_flush_record_format(contract):
    values = [
        rec(arm="control", ts=NOW - 5, metrics={"latency_ms": 10}),
        rec(arm="treatment", ts=NOW - 2, metrics={"latency_ms": 20, "error": 1}),
        rec(experiment="checkout", arm="arm-a", metrics={"revenue": 3.5}),
        rec(experiment="nobody", arm="x"),
        b"[]",
    ]
    flush = fold_all(
        contract, "telemetry", 4, [RawRecord(100 + i, v) for i, v in enumerate(values)], now=NOW
    )
    assert [k for k, _ in flush.summaries] == [b"checkout", b"ranker-v2"]
    assert flush.skipped == {"unknown_experiment": 1}
    assert flush.consumed == 5 == flush.summarised + sum(flush.deadlettered.values()) + 1
    doc = orjson.loads(flush.summaries[1][1])
    assert doc["v"] == 2 and doc["experiment"] == "ranker-v2"
    assert doc["config_version"] == EXPERIMENTS.version
    assert doc["source"] == {"topic": "telemetry", "partition": 4}
    assert doc["offsets"] == [{"topic": "telemetry", "partition": 4, "first": 100, "last": 104}]
    assert doc["span"] == {"min_ts": NOW - 5, "max_ts": NOW - 2}
    arms = arm_states(doc)
    assert set(arms) == {"control", "treatment"}
    assert arms["treatment"]["count"] == 1
    assert set(arms["control"]["metrics"]) == {"latency_ms"}
    assert arms["control"]["features"] == {}
    # Deterministic: the same input gives the same bytes.
    again = fold_all(
        contract, "telemetry", 4, [RawRecord(100 + i, v) for i, v in enumerate(values)], now=NOW
    )
    assert again.summaries == flush.summaries


def test_deadletter_headers_carry_the_source_and_reason(contract):
    flush = fold_all(contract, "tele", 2, [RawRecord(41, b"[1]", key=b"k", timestamp=123)], now=NOW)
    (d,) = flush.deadletters
    value, headers = deadletter_headers(
        d, topic="tele", partition=2, config_version="abc", max_record_bytes=100
    )
    h = dict(headers)
    assert value == b"[1]"
    assert h["armguard.reason"] == b"not_object"
    assert (h["armguard.source.topic"], h["armguard.source.partition"]) == (b"tele", b"2")
    assert h["armguard.source.offset"] == b"41"
    env = orjson.loads(h["armguard.envelope"])
    assert env == {
        "v": 1,
        "reason": "not_object",
        "detail": "a JSON list, not an object",
        "source": {"topic": "tele", "partition": 2, "offset": 41, "timestamp": 123},
        "size": 3,
        "value_included": True,
        "config_version": "abc",
    }
    value, headers = deadletter_headers(
        d, topic="tele", partition=2, config_version="abc", max_record_bytes=2
    )
    assert value is None and orjson.loads(dict(headers)["armguard.envelope"])["size"] == 3


# -- fuzz ---------------------------------------------------------------------------------------

_keys = st.sampled_from(
    ["experiment", "arm", "ts", "unit", "metrics", "features", "latency_ms", "error", "x", ""]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["ranker-v2", "checkout", "control", "treatment", "baseline", "arm-a"]),
    st.just(NOW),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=6)),
    max_leaves=20,
)


def _encode(obj) -> bytes:
    # NaN and Infinity as JavaScript literals: what a sloppy producer writes.
    import json

    return json.dumps(obj, allow_nan=True).encode()


_payloads = st.one_of(
    st.binary(max_size=64),
    _json.map(_encode),
    st.fixed_dictionaries(
        {
            "experiment": st.sampled_from(["ranker-v2", "checkout", "zzz"]) | _scalars,
            "arm": st.sampled_from(["control", "treatment", "baseline", "arm-a"]) | _scalars,
            "ts": st.floats(NOW - 100_000, NOW + 1000) | _scalars,
        },
        optional={
            "unit": _scalars,
            "metrics": st.dictionaries(_keys, _scalars, max_size=4) | _json,
            "features": st.dictionaries(st.just("query_length"), _scalars) | _json,
        },
    ).map(_encode),
    st.none(),
)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_payloads)
def test_fuzz_decode_never_raises(contract, value):
    got = contract.decode(value, now=NOW)
    assert isinstance(got, Accepted | Rejected | Skipped)
    if isinstance(got, Rejected):
        assert got.reason in REASONS
    if isinstance(got, Accepted):
        for v in (*got.metrics.values(), *got.features.values()):
            assert type(v) in (int, float) and math.isfinite(v)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(_payloads, max_size=40))
def test_fuzz_batches_reconcile_and_agree_with_decode(contract, values):
    """A batch's counts equal the sum of the single-record verdicts, and the flush serialises."""
    verdicts = [contract.decode(v, now=NOW) for v in values]
    flush = fold_all(contract, "t", 0, [RawRecord(i, v) for i, v in enumerate(values)], now=NOW)
    if not values:
        assert flush is None
        return
    accepted = sum(isinstance(v, Accepted) for v in verdicts)
    rejected: dict[str, int] = {}
    for v in verdicts:
        if isinstance(v, Rejected):
            rejected[v.reason] = rejected.get(v.reason, 0) + 1
    skipped = sum(isinstance(v, Skipped) for v in verdicts)
    assert flush.consumed == len(values) == accepted + sum(rejected.values()) + skipped
    assert (flush.summarised, flush.deadlettered) == (accepted, rejected)
    assert flush.skipped == ({"unknown_experiment": skipped} if skipped else {})
    counts = 0
    for _, raw in flush.summaries:
        for body in arm_states(orjson.loads(raw)).values():
            counts += body["count"]
            for state in (*body["metrics"].values(), *body["features"].values()):
                Summary.from_state(state)
    assert counts == accepted


# -- summarise_groups ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(0, 5),
            st.one_of(
                st.floats(-1e12, 1e12, allow_nan=False),
                st.sampled_from([0.0, -0.0, 1e-310, 5e-324, 1.0, 2.0]),
                st.floats(100.0, 104.0),  # a few adjacent buckets: dense stores
                st.floats(-104.0, -100.0),
            ),
        ),
        min_size=1,
        max_size=200,
    ),
    max_bins=st.sampled_from([16, 2048]),
    relative_accuracy=st.sampled_from([0.01, 0.05]),
)
def test_summarise_groups_equals_one_summary_per_group(data, max_bins, relative_accuracy):
    groups = np.array([g for g, _ in data])
    values = np.array([v for _, v in data])
    kw = {"max_bins": max_bins, "relative_accuracy": relative_accuracy}
    labels, states = summarise_groups(values, groups, **kw)
    # numpy_counts: int64 views instead of lists, serialised by orjson to the same bytes
    labels_np, states_np = summarise_groups(values, groups, numpy_counts=True, **kw)
    assert labels.tolist() == labels_np.tolist() == sorted(set(groups.tolist()))
    for label, state, state_np in zip(labels.tolist(), states, states_np, strict=True):
        ref = Summary(**kw)
        ref.update_many(values[groups == label])
        want = ref.to_state()
        # same encoding choice (dense or sparse per store), same bytes
        assert state["h"] == want["h"]
        h_bytes = orjson.dumps(want["h"])
        assert orjson.dumps(state["h"]) == h_bytes
        assert orjson.dumps(state_np["h"], option=orjson.OPT_SERIALIZE_NUMPY) == h_bytes
        assert (state["n"], state["min"], state["max"]) == (want["n"], want["min"], want["max"])
        scale = max(1.0, float(np.abs(values[groups == label]).max()))
        assert state["mean"] == pytest.approx(want["mean"], rel=1e-9, abs=1e-9 * scale)
        assert state["m2"] == pytest.approx(want["m2"], rel=1e-6, abs=1e-9 * scale**2)
        back = Summary.from_state(orjson.loads(orjson.dumps(state)))
        assert back.count == want["n"] and back.histogram == ref.histogram
        assert Summary.from_state(state_np).histogram == ref.histogram


def test_summarise_groups_encodes_each_store_as_summary_does():
    rng = np.random.default_rng(42)
    # group 0: 6 latencies over ~190 buckets (sparse), group 1: 1,000 close values (dense),
    # group 2: both signs and zeros, group 3: keys over more than max_bins (collapsing store)
    values = np.r_[
        rng.lognormal(5.0, 1.0, size=6),
        rng.normal(100.0, 1.0, size=1000),
        [-3.0, -3.01, -500.0, 0.0, 2.0, 7.0],
        [1e-10, 1e10, 5.0],
    ]
    groups = np.repeat([0, 1, 2, 3], [6, 1000, 6, 3])
    _labels, states = summarise_groups(values, groups)
    kinds = []
    for j, state in enumerate(states):
        want = Summary.from_values(values[groups == j]).to_state()
        assert orjson.dumps(state["h"]) == orjson.dumps(want["h"])
        assert (state["n"], state["min"], state["max"]) == (want["n"], want["min"], want["max"])
        kinds.append(tuple(isinstance(state["h"][s][0], list) for s in ("p", "n")))
    assert kinds == [(True, False), (False, False), (True, True), (True, False)]
    keys = states[3]["h"]["p"][0]  # collapsed: 1e-10 counted in the lowest kept key
    assert keys[-1] - keys[0] == 2047 and states[3]["h"]["p"][1] == [1, 1, 1]


def test_summarise_groups_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        summarise_groups(np.ones(3), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="finite"):
        summarise_groups(np.array([1.0, np.nan]), np.zeros(2, dtype=int))
    labels, states = summarise_groups(np.zeros(0), np.zeros(0, dtype=int))
    assert labels.shape == (0,) and states == []


@pytest.mark.parametrize(
    ("groups", "key_span"),
    # int64 codes, the two-key sort, int32 codes, a dense count of every code
    [(2**23, 1000), (2**23, 2**40), (2**23, 10), (50, 3)],
)
def test_distinct_pairs_counts_each_group_key_pair(groups, key_span):
    rng = np.random.default_rng(42)
    seg = np.sort(rng.integers(0, groups, size=500))
    keys = rng.choice(np.array([-key_span, -3, 0, 5, key_span]), size=500)
    pair_seg, pair_key, counts = _distinct_pairs(seg, keys)
    want, want_counts = np.unique(np.c_[seg, keys], axis=0, return_counts=True)
    assert pair_seg.tolist() == want[:, 0].tolist() and pair_key.tolist() == want[:, 1].tolist()
    assert counts.tolist() == want_counts.tolist()


def test_a_proportion_guardrails_values_outside_0_1_are_dead_lettered():
    # No range configured for "err": ingest took any |x| <= 1e100, and one value of 3 made
    # the evaluate stage refuse the summary of the whole flush (sum outside [0, count]).
    experiments = parse_experiments(
        """
experiments:
  - id: shop
    control: a
    arms: {a: 0.5, b: 0.5}
    metrics:
      spend: {max: 50}
    guardrails:
      - {metric: err, test: proportion}
      - {metric: spend, test: proportion}
      - {metric: rate, source: feature, test: proportion}
      - {metric: latency, test: mean}
""",
        where="test.yaml",
    )
    contract = Contract(experiments, IngestSettings())

    def verdict(**fields):
        body = {"experiment": "shop", "arm": "b", "ts": NOW, **fields}
        return contract.decode(orjson.dumps(body), now=NOW)

    for ok in ({"err": 0}, {"err": 1}, {"err": 0.25}, {"spend": 1}, {"latency": 3e5}):
        assert isinstance(verdict(metrics=ok), Accepted), ok
    assert isinstance(verdict(features={"rate": 1.0}), Accepted)
    for bad in ({"err": 3}, {"err": -0.5}, {"spend": 2}, {"err": 1.0000001}):
        got = verdict(metrics=bad)
        assert isinstance(got, Rejected) and got.reason == "out_of_range", bad
    got = verdict(features={"rate": 7})
    assert isinstance(got, Rejected) and got.reason == "out_of_range"
    # The batch path (what ingest runs) agrees.
    records = [
        RawRecord(i, orjson.dumps({"experiment": "shop", "arm": "b", "ts": NOW, "metrics": m}))
        for i, m in enumerate([{"err": 0}, {"err": 3}, {"err": 1}, {"spend": 2}])
    ]
    flush = fold_all(contract, "t", 0, records, now=NOW)
    assert flush.deadlettered == {"out_of_range": 2} and flush.summarised == 2
