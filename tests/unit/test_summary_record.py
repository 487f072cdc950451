"""The summary record's columnar version 2 carries exactly the summaries of version 1."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from armguard.daemon.contract import Contract, PartitionAccumulator, RawRecord, _pieces
from armguard.daemon.engine import Engine
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.settings import IngestSettings
from armguard.daemon.summarise import GroupSummaries
from armguard.daemon.summary_record import arm_states
from armguard.detectors.summary import Summary

NOW = 1_764_300_000.0

EXPERIMENTS = parse_experiments(
    """
experiments:
  - id: a
    control: control
    arms: {control: 0.25, t1: 0.25, t2: 0.25, t3: 0.25}
    metrics:
      latency_ms: {min: 0, max: 600000}
      delta: {min: -1.0e40, max: 1.0e40}
    features:
      score: {min: -100, max: 100}
  - id: b
    control: control
    arms: {control: 0.5, treatment: 0.5}
    metrics:
      latency_ms: {min: 0, max: 600000}
""",
    where="test.yaml",
)


def _same_summary(got: dict, want: dict) -> None:
    """Two Summary states describe the same summary, bit for bit (encodings may differ)."""
    assert got["n"] == want["n"]
    for key in ("sum", "mean", "m2", "min", "max"):
        assert got[key] == want[key], key  # exact: no tolerance
    g, w = Summary.from_state(got), Summary.from_state(want)
    assert g.histogram == w.histogram
    assert g == w


def _block(gs: GroupSummaries, a: int, b: int) -> dict[str, Any] | None:
    """The version-2 encoder's block before the flush wrote bytes column by column (kept
    here as the reference the new encoder is checked against): the groups at positions
    ``a .. b - 1`` of ``gs`` as one columnar block of a version-2 summary
    record (see :mod:`armguard.daemon.summary_record`), or ``None`` if one of them spans
    more than ``max_bins`` keys (its collapsed store needs a full ``state``).

    Every column is a plain list, one entry per group: ``count``, ``sum``, ``m2``, ``min``,
    ``max``, ``zero`` (values in the zero bucket); ``pos`` and ``neg`` (only when some
    group has values of that sign) are ``[nonzero, keys, counts]``: per group the number of
    non-empty buckets, then their keys and counts concatenated group after group. The mean
    is not written: it is exactly ``sum / count`` here.
    """
    if gs._wide and any(a <= j < b for j in gs._wide):
        return None
    cols = tuple(
        None
        if st is None
        else (
            st.starts.tolist(),
            st.nnz.tolist(),
            st.pair_keys.tolist(),
            st.pair_counts.tolist(),
        )
        for st in gs._stores
    )
    counts, sums, m2s, mins, maxs, zeros = gs._lists()
    out: dict[str, Any] = {
        "count": counts[a:b],
        "sum": sums[a:b],
        "m2": m2s[a:b],
        "min": mins[a:b],
        "max": maxs[a:b],
        "zero": zeros[a:b],
    }
    for name, col in zip(("pos", "neg"), cols, strict=True):
        if col is None:
            continue
        starts, nnz, keys, pcounts = col
        lo = starts[a]
        hi = starts[b - 1] + nnz[b - 1]
        if hi > lo:
            out[name] = [nnz[a:b], keys[lo:hi], pcounts[lo:hi]]
    return out


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(0, 7),
            st.one_of(
                st.floats(-1e6, 1e6, allow_nan=False),
                st.sampled_from([0.0, 1.0, -1.0, 1e-300]),
            ),
        ),
        min_size=1,
        max_size=300,
    ),
    cut=st.tuples(st.integers(0, 7), st.integers(1, 8)),
)
def test_a_block_decodes_to_the_states_of_its_groups(data, cut):
    groups = np.array([g for g, _ in data], dtype=np.int64)
    values = np.array([v for _, v in data])
    gs = GroupSummaries(values, groups, numpy_counts=True)
    a = min(cut[0], len(gs) - 1)
    b = min(max(a + 1, cut[1]), len(gs))
    blk = _block(gs, a, b)
    if blk is None:  # a group spans more than max_bins keys: only a full state holds it
        assert any(j in gs._wide for j in range(a, b))
        return
    names = [f"arm{j}" for j in range(a, b)]
    rows = orjson.loads(orjson.dumps(blk))  # through JSON, as on the topic
    rows["arm"] = list(range(b - a))
    rows["name"] = [0] * (b - a)
    rec = {"v": 2, "ra": 0.01, "mb": 2048, "arms": names, "count": [1] * len(names)}
    rec |= {"names": [["metrics", "x"]], "rows": rows}
    arms = arm_states(rec)
    for j, name in zip(range(a, b), names, strict=True):
        want = orjson.loads(orjson.dumps(gs.state(j), option=orjson.OPT_SERIALIZE_NUMPY))
        _same_summary(arms[name]["metrics"]["x"], want)


def _flush(records: list[bytes]):
    acc = PartitionAccumulator(Contract(EXPERIMENTS, IngestSettings()), "telemetry", 0)
    acc.fold([RawRecord(i, v) for i, v in enumerate(records)], now=NOW)
    return acc.drain()


def _rec(exp: str, arm: str, metrics: dict, features: dict | None = None) -> bytes:
    body = {"experiment": exp, "arm": arm, "ts": NOW - 1, "metrics": metrics}
    if features:
        body["features"] = features
    return orjson.dumps(body)


def test_flush_writes_columnar_records_equal_to_summaries_of_the_values():
    rng = np.random.default_rng(7)
    raw, expected = [], {}
    for _ in range(2_000):
        exp = "a" if rng.random() < 0.7 else "b"
        arm = (
            ["control", "t1", "t2", "t3"][rng.integers(4)]
            if exp == "a"
            else ["control", "treatment"][rng.integers(2)]
        )
        metrics = {"latency_ms": float(np.round(rng.gamma(2, 50), 2))}
        features = None
        if exp == "a" and arm != "t3":  # t3 never carries delta nor score: a block with rows
            metrics["delta"] = float(rng.normal()) if rng.random() < 0.9 else 0.0
            features = {"score": int(rng.integers(-100, 101))}
        raw.append(_rec(exp, arm, metrics, features))
        for section, d in (("metrics", metrics), ("features", features or {})):
            for name, v in d.items():
                expected.setdefault((exp, arm, section, name), []).append(v)
    flush = _flush(raw)
    docs = {k.decode(): orjson.loads(v) for k, v in flush.summaries}
    assert set(docs) == {"a", "b"} and all(d["v"] == 2 for d in docs.values())
    doc = docs["a"]
    assert doc["names"] == [
        ["metrics", "delta"],
        ["metrics", "latency_ms"],
        ["features", "score"],
    ]
    # t3 (arm 3) never carries delta nor score: only its latency_ms row.
    assert doc["rows"]["arm"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert doc["rows"]["name"] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 1]
    seen = 0
    for exp, doc in docs.items():
        for arm, body in arm_states(doc).items():
            for section in ("metrics", "features"):
                for name, state in body[section].items():
                    values = np.array(expected[(exp, arm, section, name)], dtype=np.float64)
                    ref = Summary.from_values(values)
                    got = Summary.from_state(state)
                    assert got.count == ref.count and got.histogram == ref.histogram
                    assert (got.min, got.max) == (ref.min, ref.max)
                    assert math.isclose(got.mean, ref.mean, rel_tol=1e-12, abs_tol=1e-12)
                    assert math.isclose(got.m2, ref.m2, rel_tol=1e-9, abs_tol=1e-9)
                    seen += 1
    assert seen == len(expected)


def test_an_experiment_with_a_collapsed_histogram_is_written_as_version_1():
    # delta spans 1e-30 .. 1e30: more than max_bins keys, so its store collapses.
    raw = [
        _rec("a", "control", {"latency_ms": 5.0, "delta": 1e-30}),
        _rec("a", "control", {"latency_ms": 6.0, "delta": 1e30}),
        _rec("a", "t1", {"latency_ms": 7.0, "delta": 2.0}),
        _rec("b", "treatment", {"latency_ms": 8.0}),
    ]
    docs = {k.decode(): orjson.loads(v) for k, v in _flush(raw).summaries}
    assert docs["a"]["v"] == 1 and docs["b"]["v"] == 2
    arms = arm_states(docs["a"])
    assert arms["control"]["count"] == 2 and arms["t1"]["count"] == 1
    delta = Summary.from_state(arms["control"]["metrics"]["delta"])
    ref = Summary.from_values(np.array([1e-30, 1e30]))
    assert delta.histogram == ref.histogram and delta.count == 2
    assert Summary.from_state(arms["t1"]["metrics"]["delta"]).max == 2.0
    for key in ("span", "offsets", "source", "config_version"):
        assert docs["a"][key] == docs["b"][key] or key == "span"


GOOD = {
    "v": 2,
    "experiment": "b",
    "ra": 0.01,
    "mb": 2048,
    "arms": ["control"],
    "count": [1],
    "names": [["metrics", "latency_ms"]],
    "rows": {
        "arm": [0],
        "name": [0],
        "count": [1],
        "sum": [2.0],
        "m2": [0.0],
        "min": [2.0],
        "max": [2.0],
        "zero": [0],
        "pos": [[1], [35], [1]],
    },
}


def _bad(path: tuple, value) -> dict:
    doc = orjson.loads(orjson.dumps(GOOD))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


BAD = [
    _bad(("v",), 3),
    _bad(("arms",), "control"),
    _bad(("count",), [1, 2]),
    _bad(("names",), [["logs", "latency_ms"]]),
    _bad(("names",), [["metrics"]]),
    _bad(("names",), []),
    # a name that is not a string: merged under it, the next snapshot's sorted() of the names
    # raised TypeError out of the evaluate stage (on that uncommitted record at every restart)
    _bad(("names",), [["metrics", 7]]),
    _bad(("names",), [["metrics", None]]),
    _bad(("rows", "arm"), [1]),
    _bad(("rows", "arm"), [-1]),
    _bad(("rows", "name"), [-1]),
    _bad(("rows", "count"), [0]),
    _bad(("rows", "count"), [1.5]),
    _bad(("rows", "sum"), []),
    _bad(("rows", "min"), None),
    _bad(("rows", "pos"), [[2], [35], [1]]),
    _bad(("rows", "pos"), 7),
    _bad(("rows",), []),
    _bad(("rows",), {"arm": [0]}),
    _bad(("unknown",), 0) | {"v": 0},
]
# Decoded, but not valid Summary states: the engine rejects them before merging anything.
BAD_STATES = [
    _bad(("ra",), None),
    _bad(("rows", "min"), ["low"]),
    _bad(("rows", "pos"), [[1], [35], [-1]]),
    _bad(("rows", "pos"), [[2], [40, 35], [1, 1]]),
]


@pytest.mark.parametrize("doc", BAD)
def test_malformed_version_2_records_raise_value_error(doc):
    with pytest.raises(ValueError):
        arm_states(doc)


def test_the_engine_counts_malformed_records_and_merges_good_ones():
    engine = Engine(EXPERIMENTS)
    for i, doc in enumerate(BAD + BAD_STATES):
        assert engine.apply_summary(orjson.dumps(doc), topic="s", partition=0, offset=i) == []
    assert engine.counters["summaries_invalid"] == len(BAD) + len(BAD_STATES)
    assert engine.state_for("b").arms == {}
    engine.apply_summary(orjson.dumps(GOOD), topic="s", partition=0, offset=99)
    assert engine.counters["summaries"] == 1
    st = engine.state_for("b")
    assert st is not None and st.arms["control"].metrics["latency_ms"].sum == 2.0


# -- the flush's column-by-column encoding equals the per-record one it replaced ----------------


def _previous_encoding(acc: PartitionAccumulator) -> list[tuple[bytes, bytes]]:
    """The summaries of ``acc``'s pending records as the flush wrote them before it built
    records column by column: one dict per experiment (``GroupSummaries.block``, or version 1
    through ``GroupSummaries.state``), each through ``orjson.dumps``. Call before ``drain``."""
    c = acc.contract
    if not acc._gids:
        return []
    gids = np.frombuffer(acc._gids, dtype=np.int64)
    ts = np.frombuffer(acc._ts, dtype=np.float64)
    per_group = np.bincount(gids)
    labels = np.flatnonzero(per_group)
    counts = per_group[labels]
    exp_of = c._group_exp[labels]
    first = np.flatnonzero(np.r_[True, exp_of[1:] != exp_of[:-1]])
    end = np.r_[first[1:], labels.shape[0]]
    span_lo = np.full(len(c._exp_ids), np.inf)
    span_hi = np.full(len(c._exp_ids), -np.inf)
    np.minimum.at(span_lo, c._group_exp[gids], ts)
    np.maximum.at(span_hi, c._group_exp[gids], ts)
    names, parts_v, parts_g = [], [], []
    for section, cols in (("metrics", acc._mcols), ("features", acc._fcols)):
        for name, (vals, grp) in cols.items():
            if vals:
                names.append([section, name])
                parts_v.append(np.frombuffer(vals, dtype=np.float64))
                parts_g.append(np.frombuffer(grp, dtype=np.int64))
    n_names = max(len(names), 1)
    gs = None
    if names:
        gs = GroupSummaries(
            np.concatenate(parts_v),
            np.concatenate([g * n_names + m for m, g in enumerate(parts_g)]),
            relative_accuracy=c.relative_accuracy,
            numpy_counts=True,
        )
        series = gs.labels
        row_gid = series // n_names
        rank = labels.searchsorted(row_gid)
        row_arm = (rank - first[first.searchsorted(rank, side="right") - 1]).tolist()
        row_name = (series - row_gid * n_names).tolist()
        lo = series.searchsorted(labels[first] * n_names).tolist()
        hi = series.searchsorted(labels[end - 1] * n_names + n_names).tolist()
    head = {
        "experiment": None,
        "config_version": c.config_version,
        "source": {"topic": acc.topic, "partition": acc.partition},
        "offsets": [
            {
                "topic": acc.topic,
                "partition": acc.partition,
                "first": acc.first_offset,
                "last": acc.last_offset,
            }
        ],
    }
    arm_names = [c._groups[g][1] for g in labels.tolist()]
    out = []
    for k, (a, b, e) in enumerate(
        zip(first.tolist(), end.tolist(), exp_of[first].tolist(), strict=True)
    ):
        rec = {
            "v": 2,
            **head,
            "experiment": c._exp_ids[e],
            "span": {"min_ts": float(span_lo[e]), "max_ts": float(span_hi[e])},
            "arms": arm_names[a:b],
            "count": counts[a:b].tolist(),
        }
        if gs is not None and lo[k] < hi[k]:
            rows = _block(gs, lo[k], hi[k])
            if rows is None:
                arms = {}
                for g, arm, n in zip(labels[a:b].tolist(), rec["arms"], rec["count"], strict=True):
                    body = {"count": n, "metrics": {}, "features": {}}
                    for m, (section, name) in enumerate(names):
                        try:
                            body[section][name] = gs.state(gs.index(g * n_names + m))
                        except KeyError:
                            continue
                    arms[arm] = body
                keep = ("experiment", "config_version", "source", "offsets", "span")
                rec = {"v": 1, **{key: rec[key] for key in keep}, "arms": arms}
            else:
                rec |= {"ra": c.relative_accuracy, "mb": gs.max_bins, "names": names}
                rows["arm"] = row_arm[lo[k] : hi[k]]
                rows["name"] = row_name[lo[k] : hi[k]]
                rec["rows"] = rows
        out.append(
            (rec["experiment"].encode(), orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY))
        )
    return sorted(out)


# Config order is not key order; "c-none" summarises nothing (records without rows); "a"
# takes negative values and zeros and its delta can collapse (1e-30 and 1e30 in one arm).
MIXED = parse_experiments(
    """
experiments:
  - id: zz
    control: control
    arms: {control: 0.5, treatment: 0.5}
    metrics:
      latency_ms: {min: 0, max: 600000}
  - id: a
    control: control
    arms: {control: 0.25, t1: 0.25, t2: 0.25, t3: 0.25}
    metrics:
      latency_ms: {min: 0, max: 600000}
      delta: {min: -1.0e40, max: 1.0e40}
    features:
      score: {min: -100, max: 100}
  - id: c-none
    control: control
    arms: {control: 0.5, treatment: 0.5}
  - id: b.1
    control: control
    arms: {control: 0.5, treatment: 0.5}
    metrics:
      latency_ms: {min: 0, max: 600000}
    features:
      score: {min: -100, max: 100}
""",
    where="mixed.yaml",
)
_ARMS = {e.id: list(e.arms) for e in MIXED.experiments}
_VALUES = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, -1e-300, 1e-30, 1e30, -1e30, 0.5, 2.25]),
    st.integers(-100, 100),
)


@st.composite
def _telemetry(draw) -> list[bytes]:
    out = []
    for _ in range(draw(st.integers(1, 60))):
        exp = draw(st.sampled_from([*_ARMS, "unknown"]))
        arm = draw(st.sampled_from(_ARMS.get(exp, ["control"])))
        body = {"experiment": exp, "arm": arm, "ts": NOW - draw(st.floats(0, 100))}
        metrics = {
            name: draw(_VALUES)
            for name in draw(st.sets(st.sampled_from(["latency_ms", "delta", "other"])))
        }
        if metrics:
            body["metrics"] = metrics
        if draw(st.booleans()):
            body["features"] = {"score": draw(_VALUES)}
        out.append(orjson.dumps(body))
    return out


def _both_encodings(contract: Contract, values: list[bytes]):
    acc = PartitionAccumulator(contract, "telemetry", 3)
    acc.fold([RawRecord(100 + i, v) for i, v in enumerate(values)], now=NOW)
    want = _previous_encoding(acc)
    flush = acc.drain()
    return (flush.summaries if flush else []), want


@settings(max_examples=300, deadline=None)
@given(values=_telemetry())
def test_flush_bytes_equal_the_previous_per_record_encoding(values):
    got, want = _both_encodings(Contract(MIXED, IngestSettings()), values)
    assert [k for k, _ in got] == sorted(k for k, _ in got)
    assert got == want  # byte for byte: same keys, same key order, same number formatting
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert arm_states(orjson.loads(g)) == arm_states(orjson.loads(w))


@pytest.mark.parametrize("collapse", [False, True])
def test_a_seeded_flush_of_many_experiments_is_byte_identical_to_the_previous_encoding(collapse):
    text = "experiments:\n" + "".join(
        f"  - id: e{i:03d}\n    control: c\n    arms: {{c: 0.5, t: 0.5}}\n"
        f"    metrics: {{x: {{min: -1.0e40, max: 1.0e40}}, y: {{min: 0, max: 1}}}}\n"
        for i in range(300, 0, -1)  # config order is the reverse of key order
    )
    contract = Contract(parse_experiments(text, where="many.yaml"), IngestSettings())
    rng = np.random.default_rng(11)
    n = 20_000
    x = np.where(rng.random(n) < 0.2, 0.0, rng.normal(0, 100, n))
    if collapse:
        x[:2] = [1e-30, 1e30]
    values = [
        orjson.dumps(
            {
                "experiment": f"e{int(e):03d}",
                "arm": "ct"[int(a)],
                "ts": NOW - float(t),
                "metrics": {"x": float(v)} | ({"y": int(y)} if y >= 0 else {}),
            }
        )
        for e, a, t, v, y in zip(
            rng.integers(1, 301, n),
            rng.integers(0, 2, n),
            rng.random(n) * 60,
            x,
            rng.integers(-1, 2, n),
            strict=True,
        )
    ]
    values[0] = orjson.dumps({"experiment": "e007", "arm": "c", "ts": NOW, "metrics": {}})
    got, want = _both_encodings(contract, values)
    assert len(got) == 300 and got == want
    versions = [orjson.loads(v)["v"] for _, v in got]
    assert versions.count(1) == (1 if collapse else 0)


@given(
    items=st.lists(st.text(max_size=6), max_size=12),
    sizes=st.lists(st.integers(0, 3), min_size=1, max_size=8),
)
def test_pieces_cut_the_json_of_a_list_at_group_bounds(items, sizes):
    # Strings with commas, quotes and escapes take the slower path; the pieces are the same.
    bounds = np.minimum(np.r_[0, np.cumsum(sizes)], len(items))
    bounds[-1] = len(items)
    pieces = _pieces(items, bounds)
    for k, piece in enumerate(pieces):
        assert piece == orjson.dumps(items[bounds[k] : bounds[k + 1]])[1:-1]
    keep = np.arange(len(sizes)) % 2 == 0
    kept = _pieces(items, bounds, keep=keep)
    assert kept == [p if k else b"" for p, k in zip(pieces, keep.tolist(), strict=True)]
