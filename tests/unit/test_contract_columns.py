"""The column-wise fold equals the record-by-record statement of the data contract.

``PartitionAccumulator.fold`` checks a chunk of records column by column and hands the records
it cannot accept to ``_fold_each``, the contract stated record by record. Whatever the input,
the two must leave the accumulator in the same state: the same values in the same order in
every column, the same dead letters (reason, detail, order), the same skipped count.
"""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from armguard.daemon import contract as contract_module
from armguard.daemon.contract import Contract, PartitionAccumulator, RawRecord
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.settings import IngestSettings
from tests.unit.test_contract import EXPERIMENTS, NOW, _encode, _payloads, _scalars

# Ids and arms that str() of a JSON scalar spells: the group key must tell 5 from "5".
CONFUSABLE = parse_experiments(
    """
experiments:
  - id: "5"
    control: "0"
    arms: {"0": 0.5, "1": 0.5}
    metrics:
      m: {min: 0, max: 10}
  - id: None
    control: "True"
    arms: {"True": 0.5, "nan": 0.5}
    metrics:
      m: {min: -1, max: 1}
      big: {}
""",
    where="confusable.yaml",
)


def _state(acc: PartitionAccumulator) -> tuple:
    cols = {
        section: {n: (v.tolist(), g.tolist()) for n, (v, g) in cols.items()}
        for section, cols in (("metrics", acc._mcols), ("features", acc._fcols))
    }
    dead = [(d.record.offset, d.reason, d.detail) for d in acc._deadletters]
    return (acc._gids.tolist(), acc._ts.tolist(), cols, dead, acc._skipped, acc._skipped_detail)


def _check(
    contract: Contract, values: list, now: float | None, stamps: list[int], chunk: int
) -> None:
    records = [
        RawRecord(i, v, None, t) for i, (v, t) in enumerate(zip(values, stamps, strict=True))
    ]
    fast = PartitionAccumulator(contract, "t", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(contract_module, "_CHUNK", chunk)
        assert fast.fold(records, now=now) == len(records)
    each = PartitionAccumulator(contract, "t", 0)
    each._fold_each(records, now)
    assert _state(fast) == _state(each)


chunks = pytest.mark.parametrize("chunk", [4096, 3], ids=["one chunk", "chunks of 3"])


def _good(exps: list[tuple[str, str]], names: list[str]) -> st.SearchStrategy[bytes]:
    """Mostly valid records, with one field now and then replaced by anything."""
    value = st.one_of(
        st.floats(-2, 20, allow_nan=False),
        st.integers(-3, 12),
        st.sampled_from([0, 1, 0.5, 1.5, -1e-9, -0.0, 10_000.5, 2**53, 2**53 + 1, -(2**60), 1e300]),
        st.sampled_from([True, None, "1", [1], {"a": 1}]),
    )
    base = st.fixed_dictionaries(
        {
            "pair": st.sampled_from(exps),
            # Mostly fresh (against NOW and the Kafka timestamps below), now and then not.
            "ts": st.floats(NOW - 60, NOW)
            | st.integers(int(NOW) - 10, int(NOW))
            | st.sampled_from([NOW - 3600 - 1e-6, NOW - 3600, NOW + 300, NOW + 400, NOW - 1e6]),
            "unit": st.sampled_from(["u", 7, None]),
            "metrics": st.dictionaries(st.sampled_from(names), value, max_size=4),
            "features": st.dictionaries(st.sampled_from(names), value, max_size=2),
        }
    )

    def build(d: dict, spoil: tuple | None) -> bytes:
        exp, arm = d.pop("pair")
        obj = {"experiment": exp, "arm": arm, **d}
        if spoil is not None:
            key, v = spoil
            if v is _DROP:
                obj.pop(key, None)
            else:
                obj[key] = v
        return json.dumps(obj, allow_nan=True, separators=(",", ":")).encode()

    spoil = (
        st.none()
        | st.none()
        | st.tuples(
            st.sampled_from(["experiment", "arm", "ts", "unit", "metrics", "features"]),
            _scalars | st.just(_DROP),
        )
    )
    return st.builds(build, base, spoil)


_DROP = object()
_MAIN_GROUPS = [
    ("ranker-v2", "control"),
    ("ranker-v2", "treatment"),
    ("checkout", "baseline"),
    ("checkout", "arm-a"),
    ("checkout", "nope"),
    ("zzz", "control"),
]
_MAIN_NAMES = ["latency_ms", "error", "revenue", "query_length", "clicks", "x"]
_CONF_GROUPS = [("5", "0"), ("5", "1"), ("None", "True"), ("None", "nan"), ("5", "True")]


def _batches(good: st.SearchStrategy[bytes]) -> st.SearchStrategy[list]:
    # Four in five records from `good`, the rest anything at all.
    record = st.integers(0, 4).flatmap(lambda k: good if k else _payloads)
    return st.lists(record, max_size=30)


_stamps = st.lists(
    st.integers(int(NOW * 1000), int(NOW * 1000) + 60_000) | st.just(int(NOW * 1000) - 10**9),
    max_size=30,
)


@chunks
@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=_batches(_good(_MAIN_GROUPS, _MAIN_NAMES)), now=st.none() | st.just(NOW), stamps=_stamps
)
def test_columns_equal_record_by_record(chunk, values, now, stamps):
    contract = Contract(EXPERIMENTS, IngestSettings(max_record_bytes=200))
    stamps = ((stamps or [0]) * 31)[: len(values)]
    _check(contract, values, now, stamps, chunk)


@chunks
@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(
        _good(_CONF_GROUPS, ["m", "big"])
        | st.builds(
            lambda e, a: orjson.dumps({"experiment": e, "arm": a, "ts": NOW, "metrics": {"m": 1}}),
            st.sampled_from([5, None, True, 5.0, "5", "None"]),
            st.sampled_from([0, 1, True, float("nan"), "0", "True", None]),
        ),
        max_size=30,
    )
)
def test_ids_that_scalars_spell_are_matched_by_strings_only(chunk, values):
    contract = Contract(CONFUSABLE, IngestSettings())
    assert contract._key(5, 0) != contract._key("5", "0")
    _check(contract, values, NOW, [0] * len(values), chunk)


@chunks
@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=_batches(_good(_MAIN_GROUPS, _MAIN_NAMES)))
def test_nested_paths_columns_equal_record_by_record(chunk, values):
    nested = IngestSettings(experiment_field="ctx.experiment", metrics_field="data.metrics")

    def move(v):
        try:
            obj = orjson.loads(v)
        except (orjson.JSONDecodeError, TypeError):
            return v
        if type(obj) is not dict:
            return v
        if "experiment" in obj:
            obj["ctx"] = {"experiment": obj.pop("experiment")}
        if "metrics" in obj:
            obj["data"] = {"metrics": obj.pop("metrics")}
        return _encode(obj)

    moved = [move(v) for v in values]
    _check(Contract(EXPERIMENTS, nested), moved, NOW, [0] * len(values), chunk)


def test_a_plain_key_unless_an_id_could_be_a_scalar():
    assert Contract(EXPERIMENTS, IngestSettings())._key("a", "b") == "a\0b"
    assert Contract(CONFUSABLE, IngestSettings())._key("a", "b") == "'a'\0'b'"


def test_every_valid_record_takes_the_column_path(monkeypatch):
    # The bulk path is what makes ingest fast: a clean batch must not fall back record by record.
    contract = Contract(EXPERIMENTS, IngestSettings())
    values = [
        orjson.dumps(
            {
                "experiment": "ranker-v2",
                "arm": "treatment",
                "ts": NOW - i,
                "unit": "u",
                "metrics": {"latency_ms": float(i), "error": i % 2},
                "features": {"query_length": 3},
            }
        )
        for i in range(50)
    ] + [orjson.dumps({"experiment": "elsewhere", "arm": "a", "ts": NOW})]
    acc = PartitionAccumulator(contract, "t", 0)
    calls = []
    monkeypatch.setattr(acc, "_fold_each", lambda recs, now: calls.append(len(recs)))
    acc.fold([RawRecord(i, v) for i, v in enumerate(values)], now=NOW)
    assert calls == []
    assert len(acc._gids) == 50 and acc._skipped == 1
    assert acc._mcols["latency_ms"][0].tolist() == [float(i) for i in range(50)]


_ODD_VALUES = [True, False, None, "1", [1], {"a": 1}, 2**53, 2**53 + 1, -(2**63), 2**64 - 1, 1e300]
# The freshness bounds against NOW (max_lateness_s 86,400, max_future_skew_s 300) and around.
_EDGES_TS = [NOW - 86_400, NOW - 86_400.5, NOW + 300, NOW + 300.5, NOW + 250, int(NOW) + 300]
_BOUNDS = [0, 1, -0.0, 1.5, -1e-9, 1 + 1e-12, 10_000, 10_000.5, 600_000, 600_000.001, 1e100, 2e100]


def _random_values(rng: np.random.Generator, n: int) -> list[bytes]:
    """Mostly valid records of the test experiments, values often on a range's edges, and a
    field spoiled in one record of five."""
    groups = _MAIN_GROUPS
    out = []
    for _ in range(n):
        exp, arm = groups[rng.integers(len(groups))]

        def value():
            u = rng.random()
            if u < 0.5:
                return float(rng.uniform(-2, 20))
            if u < 0.8:
                return _BOUNDS[rng.integers(len(_BOUNDS))]
            if u < 0.9:
                return int(rng.integers(-3, 12))
            return _ODD_VALUES[rng.integers(len(_ODD_VALUES))]

        obj = {
            "experiment": exp,
            "arm": arm,
            "ts": NOW - float(rng.exponential(20_000))
            if rng.random() < 0.8
            else _EDGES_TS[rng.integers(len(_EDGES_TS))],
            "unit": ["u", 7, None][rng.integers(3)],
            "metrics": {_MAIN_NAMES[k]: value() for k in rng.integers(6, size=rng.integers(4))},
        }
        if rng.random() < 0.3:
            obj["features"] = {"query_length": value()}
        if rng.random() < 0.2:
            field = ["experiment", "arm", "ts", "unit", "metrics", "features"][rng.integers(6)]
            if rng.random() < 0.3:
                obj.pop(field, None)
            else:
                obj[field] = _ODD_VALUES[rng.integers(len(_ODD_VALUES))]
        text = json.dumps(obj, separators=(",", ":")).encode()
        u = rng.random()
        if u < 0.01:
            text = text[:-1]
        elif u < 0.02:
            text = None
        elif u < 0.03:
            text = b"[" + text + b"]"
        out.append(text)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [4096, 7])
def test_random_batches_columns_equal_record_by_record(seed, chunk):
    rng = np.random.default_rng(seed)
    contract = Contract(EXPERIMENTS, IngestSettings(max_record_bytes=160))
    values = _random_values(rng, 5_000)
    stamps = (int(NOW * 1000) + rng.integers(-100_000_000, 60_000, size=5_000)).tolist()
    for now in (NOW, None):
        _check(contract, values, now, stamps, chunk)


def test_integers_beyond_two_to_the_53_are_compared_exactly():
    # As a float, 2**53 + 1 is 2**53 and would pass a maximum of 2**53: the record-by-record
    # check compares the integer itself.
    exps = parse_experiments(
        """
experiments:
  - id: e
    control: a
    arms: {a: 0.5, b: 0.5}
    metrics:
      m: {min: 0, max: 9007199254740992}
""",
        where="big.yaml",
    )
    contract = Contract(exps, IngestSettings())
    values = [
        orjson.dumps({"experiment": "e", "arm": "a", "ts": NOW, "metrics": {"m": v}})
        for v in (2**53, 2**53 + 1, 2**53 - 1, 2**62)
    ]
    _check(contract, values, NOW, [0] * len(values), 4096)
    acc = PartitionAccumulator(contract, "t", 0)
    acc.fold([RawRecord(i, v) for i, v in enumerate(values)], now=NOW)
    assert acc._mcols["m"][0].tolist() == [2.0**53, 2.0**53 - 1]
    assert [d.reason for d in acc._deadletters] == ["out_of_range", "out_of_range"]
