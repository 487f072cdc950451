"""armguard simulate: the generator (determinism, allocation, injections, bad records, scenario
validation) and its file/stdout edge."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from armguard.daemon.errors import ConfigError
from armguard.daemon.experiments import load_experiments, parse_experiments
from armguard.daemon.simulate import (
    BAD_KINDS,
    INGEST_REASONS,
    BadRecords,
    Bernoulli,
    Drift,
    ExperimentSpec,
    FieldNames,
    LogNormal,
    Normal,
    Regression,
    Scenario,
    Simulation,
    Srm,
    load_scenario,
    parse_scenario,
)
from armguard.daemon.simulate_sinks import Pacer, kafka_partition, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
START = 1_764_300_000.0

EXPS = parse_experiments(
    """
experiments:
  - id: ranker-v2
    control: control
    arms: {control: 0.5, treatment-a: 0.25, treatment-b: 0.25}
    metrics:
      latency_ms: {min: 0, max: 600000}
      error: {min: 0, max: 1}
    features:
      query_length: {min: 0, max: 10000}
    guardrails:
      - {metric: error, test: proportion, action: kill}
      - {metric: latency_ms, test: mean, margin: "2%", action: kill}
      - {metric: query_length, source: feature, test: drift}
  - id: checkout
    control: base
    arms: {base: 0.7, alt: 0.3}
    guardrails:
      - {metric: revenue, test: mean, harmful: decrease}
""",
    where="test.yaml",
)

RANKER = ExperimentSpec(
    id="ranker-v2",
    metrics={
        "latency_ms": LogNormal(median=120, sigma=0.4),
        "error": Bernoulli(p=0.01),
    },
    features={"query_length": LogNormal(median=20, sigma=0.5, decimals=0)},
)


def sim(**kw) -> Simulation:
    kw.setdefault("experiments", [RANKER])
    kw.setdefault("records", 20_000)
    kw.setdefault("rate", 1000.0)
    return Simulation(Scenario(**kw), EXPS, start_ts=START)


def decoded(s: Simulation) -> list[dict]:
    return [orjson.loads(v) for v in s.values()]


def columns(s: Simulation):
    """Concatenated columns of every block, plus the decoded good records."""
    batches = list(s.batches())
    cat = lambda name: np.concatenate([getattr(b, name) for b in batches])  # noqa: E731
    values = [v for b in batches for v in b.values]
    return cat("ts"), cat("experiment"), cat("arm"), cat("bad"), values


# -- determinism ---------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_blocks_are_random_access():
    a = list(sim(seed=7, block_records=1000).values())
    b = list(sim(seed=7, block_records=1000).values())
    assert a == b
    assert len(a) == 20_000
    c = list(sim(seed=8, block_records=1000).values())
    assert a != c
    s = sim(seed=7, block_records=1000)
    assert s.block(13).values == a[13_000:14_000]  # no need to generate blocks 0..12
    assert s.block(13).first == 13_000


def test_total_records_from_duration_and_last_block_is_partial():
    s = sim(records=None, duration_s=2.5, rate=1000, block_records=1000)
    assert s.total_records == 2500 and s.total_blocks == 3
    assert [len(b) for b in s.batches()] == [1000, 1000, 500]
    endless = sim(records=None)
    assert endless.total_records is None and endless.total_blocks is None
    assert len(endless.block(10**6)) == 4096


def test_event_time_is_start_plus_index_over_rate():
    ts, *_ = columns(sim(records=5000, rate=250.0))
    np.testing.assert_allclose(ts, START + np.arange(5000) / 250.0, rtol=0, atol=1e-6)
    recs = decoded(sim(records=3, rate=4.0))
    assert [r["ts"] for r in recs] == [START, START + 0.25, START + 0.5]


def test_start_ts_is_an_argument_never_the_clock():
    with pytest.raises(ValueError, match="start_ts"):
        Simulation(Scenario(experiments=[RANKER]), EXPS)
    s = Simulation(Scenario(experiments=[RANKER], start_ts=5.0, records=1), EXPS)
    assert decoded(s)[0]["ts"] == 5.0


# -- shape and distributions ------------------------------------------------------------------


def test_record_shape_and_defaults_cover_every_summarised_name():
    recs = decoded(Simulation(Scenario(records=4000), EXPS, start_ts=START))
    ranker = [r for r in recs if r["experiment"] == "ranker-v2"]
    checkout = [r for r in recs if r["experiment"] == "checkout"]
    assert ranker and checkout
    r = ranker[0]
    assert set(r) == {"experiment", "arm", "ts", "unit", "metrics", "features"}
    assert set(r["metrics"]) == {"latency_ms", "error"}
    assert set(r["features"]) == {"query_length"}
    assert r["unit"].startswith("u")
    # error's contract is [0, 1]: defaulted to a bernoulli; latency within its contract.
    assert {x["metrics"]["error"] for x in ranker} <= {0, 1}
    assert all(0 <= x["metrics"]["latency_ms"] <= 600000 for x in ranker)
    assert set(checkout[0]) == {"experiment", "arm", "ts", "unit", "metrics"}
    assert set(checkout[0]["metrics"]) == {"revenue"}


def test_distributions_match_their_parameters():
    spec = ExperimentSpec(
        id="ranker-v2",
        metrics={
            "latency_ms": LogNormal(mean=200, sigma=0.5, decimals=None),
            "error": Bernoulli(p=0.1),
            "score": Normal(mean=5, sd=2, decimals=None),
        },
    )
    recs = decoded(sim(experiments=[spec], records=40_000, seed=3))
    lat = np.array([r["metrics"]["latency_ms"] for r in recs])
    err = np.array([r["metrics"]["error"] for r in recs])
    score = np.array([r["metrics"]["score"] for r in recs])
    n = len(recs)
    sd_lat = 200 * math.sqrt(math.exp(0.25) - 1)
    assert abs(lat.mean() - 200) < 5 * sd_lat / math.sqrt(n)
    assert abs(np.log(lat).std() - 0.5) < 0.01
    assert abs(err.mean() - 0.1) < 5 * math.sqrt(0.09 / n)
    assert abs(score.mean() - 5) < 5 * 2 / math.sqrt(n)
    assert abs(score.std() - 2) < 0.05


def test_values_are_clipped_to_the_contract_and_rounded():
    spec = ExperimentSpec(id="ranker-v2", metrics={"latency_ms": Normal(mean=0, sd=10, decimals=1)})
    recs = decoded(sim(experiments=[spec], records=2000))
    lat = [r["metrics"]["latency_ms"] for r in recs]
    assert min(lat) == 0.0  # half the normal draws are negative: clipped to the contract's min
    assert all(round(x, 1) == x for x in lat)


def test_field_names_follow_the_ingest_settings_and_dots_nest():
    fields = FieldNames(experiment="exp", ts="ctx.time", metrics="m", features="ctx.f")
    s = Simulation(Scenario(experiments=[RANKER], records=2), EXPS, start_ts=START, fields=fields)
    r = decoded(s)[0]
    assert set(r) == {"exp", "arm", "ctx", "unit", "m"}
    assert set(r["ctx"]) == {"time", "f"} and r["ctx"]["time"] == START
    assert set(r["ctx"]["f"]) == {"query_length"}


def test_no_unit_pool_means_no_unit_field():
    s = sim(units=None, records=100)
    assert all("unit" not in r for r in decoded(s))
    assert s.block(0).unit is None


# -- allocation ---------------------------------------------------------------------------------


def _within_binomial(count: int, n: int, p: float, extra_var: float = 0.0, z: float = 4.5) -> bool:
    sd = math.sqrt(n * p * (1 - p) + extra_var)
    return abs(count - n * p) <= z * sd


def test_arm_allocation_matches_design_per_record_draws():
    _, _, arm, _, _ = columns(sim(units=None, records=60_000, seed=11))
    for code, p in enumerate([0.5, 0.25, 0.25]):
        assert _within_binomial(int((arm == code).sum()), len(arm), p)


def test_arm_allocation_matches_design_with_sticky_units():
    n, pool = 60_000, 1000
    _, _, arm, _, _ = columns(sim(units=pool, records=n, seed=12))
    for code, p in enumerate([0.5, 0.25, 0.25]):
        # the pool splits exactly as designed, so even a small pool adds no bias
        assert _within_binomial(int((arm == code).sum()), n, p)


@pytest.mark.parametrize("pool", [1, 7, 1000, 65_537])
def test_unit_permutation_is_a_bijection_so_the_pool_splits_exactly(pool):
    from armguard.daemon.simulate import _permute, _round_keys

    perm = _permute(np.arange(pool), pool, _round_keys(123))
    assert sorted(perm.tolist()) == list(range(pool))
    position = (perm + 0.5) / pool
    for share in (0.5, 0.25, 0.1):
        assert abs(int((position < share).sum()) - share * pool) <= 1
    if pool > 1000:
        other = _permute(np.arange(pool), pool, _round_keys(124))
        assert abs(np.corrcoef(perm, other)[0, 1]) < 0.02  # experiments bucket independently


def test_units_are_sticky_to_their_arm():
    s = sim(units=500, records=20_000, seed=5)
    arm_of: dict[int, int] = {}
    for b in s.batches():
        for u, a in zip(b.unit.tolist(), b.arm.tolist(), strict=True):
            assert arm_of.setdefault(u, a) == a
    assert len(arm_of) == 500


def test_experiment_shares():
    specs = [ExperimentSpec(id="ranker-v2", share=3.0), ExperimentSpec(id="checkout", share=1.0)]
    _, exp, arm, _, values = columns(sim(experiments=specs, records=40_000, units=None))
    assert _within_binomial(int((exp == 0).sum()), len(exp), 0.75)
    # arms are per experiment: checkout's alt arm has 30% of checkout's records
    k = exp == 1
    assert _within_binomial(int((arm[k] == 1).sum()), int(k.sum()), 0.3)
    r = orjson.loads(values[int(np.flatnonzero(k)[0])])
    assert r["experiment"] == "checkout" and r["arm"] in ("base", "alt")


# -- injections ---------------------------------------------------------------------------------


def test_regression_changes_only_its_arm_from_its_time_on():
    kw = dict(seed=21, records=30_000, rate=1000.0, units=None)
    base = sim(**kw)
    reg = sim(
        **kw,
        inject=[
            Regression(
                experiment="ranker-v2",
                arm="treatment-a",
                metric="latency_ms",
                at_s=10,
                relative=0.5,
            ),
            Regression(experiment="ranker-v2", arm="treatment-a", metric="error", at_s=10, p=0.2),
        ],
    )
    _, _, arm, _, _ = columns(base)
    before, after = decoded(base), decoded(reg)
    at = 10_000  # at_s * rate
    for i, (x, y) in enumerate(zip(before, after, strict=True)):
        if i < at or arm[i] != 1:
            assert x == y
        else:
            assert y["metrics"]["latency_ms"] == pytest.approx(
                x["metrics"]["latency_ms"] * 1.5, abs=2e-3
            )
    treat_after = [y for i, y in enumerate(after) if i >= at and arm[i] == 1]
    err = np.mean([y["metrics"]["error"] for y in treat_after])
    assert abs(err - 0.2) < 5 * math.sqrt(0.16 / len(treat_after))
    ctrl_after = [y for i, y in enumerate(after) if i >= at and arm[i] == 0]
    assert np.mean([y["metrics"]["error"] for y in ctrl_after]) < 0.02


def test_regression_window_ends_at_until_s_and_shift_works_on_bernoulli():
    s = sim(
        seed=2,
        records=30_000,
        units=None,
        inject=[
            Regression(
                experiment="ranker-v2",
                arm="control",
                metric="error",
                at_s=10,
                until_s=20,
                shift=0.3,
            )
        ],
    )
    _, _, arm, _, values = columns(s)
    err = np.array([orjson.loads(v)["metrics"]["error"] for v in values])
    idx = np.arange(len(err))
    ctrl = arm == 0
    during = ctrl & (idx >= 10_000) & (idx < 20_000)
    outside = ctrl & ~((idx >= 10_000) & (idx < 20_000))
    assert abs(err[during].mean() - 0.31) < 0.03
    assert err[outside].mean() < 0.02


def test_srm_changes_the_allocation_from_its_time_on():
    s = sim(
        seed=4,
        records=40_000,
        units=None,
        inject=[
            Srm(
                experiment="ranker-v2",
                allocation={"control": 0.7, "treatment-a": 0.1, "treatment-b": 0.2},
                at_s=20,
            )
        ],
    )
    _, _, arm, _, _ = columns(s)
    first, second = arm[:20_000], arm[20_000:]
    for code, (p0, p1) in enumerate([(0.5, 0.7), (0.25, 0.1), (0.25, 0.2)]):
        assert _within_binomial(int((first == code).sum()), len(first), p0)
        assert _within_binomial(int((second == code).sum()), len(second), p1)


def test_drift_changes_a_feature_in_one_arm_or_all():
    one = sim(
        seed=6,
        records=20_000,
        units=None,
        inject=[
            Drift(
                experiment="ranker-v2",
                feature="query_length",
                arm="treatment-b",
                at_s=5,
                relative=1.0,
            )
        ],
    )
    _, _, arm, _, values = columns(one)
    q = np.array([orjson.loads(v)["features"]["query_length"] for v in values])
    idx = np.arange(len(q))
    late = idx >= 5000
    med = lambda m: float(np.median(q[m]))  # noqa: E731
    assert 18 <= med(~late & (arm == 2)) <= 22
    assert 36 <= med(late & (arm == 2)) <= 44
    assert 18 <= med(late & (arm == 0)) <= 22
    every = sim(
        seed=6,
        records=20_000,
        units=None,
        inject=[
            Drift(
                experiment="ranker-v2",
                feature="query_length",
                at_s=5,
                distribution=Normal(mean=500, sd=1, decimals=0),
            )
        ],
    )
    _, _, arm, _, values = columns(every)
    q = np.array([orjson.loads(v)["features"]["query_length"] for v in values])
    assert np.all(np.abs(q[5000:] - 500) <= 6)
    assert np.all(q[:5000] < 400)


# -- bad records ---------------------------------------------------------------------------------


def _bad_sim(**kw) -> Simulation:
    return sim(records=20_000, seed=9, **kw)


def test_every_bad_kind_is_produced_with_its_shape():
    s = _bad_sim(inject=[BadRecords(fraction=0.2)])
    ts, _, arm, bad, values = columns(s)
    names = list(BAD_KINDS)
    arms = ("control", "treatment-a", "treatment-b")
    for code, kind in enumerate(names):
        rows = np.flatnonzero(bad == code)
        assert len(rows) > 100, kind
        for j in rows[:50].tolist():
            v = values[j]
            if kind == "malformed_json":
                with pytest.raises(orjson.JSONDecodeError):
                    orjson.loads(v)
                continue
            if kind == "invalid_utf8":
                with pytest.raises(UnicodeDecodeError):
                    v.decode("utf-8")
                continue
            r = orjson.loads(v)
            if kind == "not_an_object":
                assert isinstance(r, list) and r[0]["experiment"] == "ranker-v2"
                continue
            assert isinstance(r, dict)
            if kind == "missing_field":
                assert len({"experiment", "arm", "ts"} - set(r)) == 1
            elif kind == "wrong_type":
                assert isinstance(r["ts"], str)
            elif kind == "out_of_range":
                m, f = r["metrics"], r["features"]
                assert m["error"] > 1 or m["latency_ms"] > 600000 or f["query_length"] > 10000
            elif kind == "unknown_arm":
                assert r["arm"] not in arms
            elif kind == "stale_ts":
                assert r["ts"] == pytest.approx(ts[j] - 30 * 86400, abs=1e-6)
            elif kind == "future_ts":
                assert r["ts"] == pytest.approx(ts[j] + 86400, abs=1e-6)
            elif kind == "unknown_experiment":
                assert r["experiment"] != "ranker-v2" and r["arm"] == arms[arm[j]]
    good = np.flatnonzero(bad < 0)
    assert all(orjson.loads(values[j])["experiment"] == "ranker-v2" for j in good[:200].tolist())
    assert _within_binomial(int((bad >= 0).sum()), len(bad), 0.2)
    assert set(INGEST_REASONS) == set(BAD_KINDS)


def test_bad_records_respect_window_kinds_and_experiment():
    specs = [RANKER, ExperimentSpec(id="checkout")]
    s = sim(
        experiments=specs,
        records=20_000,
        seed=10,
        inject=[
            BadRecords(
                fraction=0.5,
                kinds=("wrong_type", "unknown_arm"),
                experiment="checkout",
                at_s=5,
                until_s=10,
            )
        ],
    )
    _, exp, _, bad, _ = columns(s)
    idx = np.arange(len(bad))
    marked = bad >= 0
    assert not marked[(idx < 5000) | (idx >= 10_000)].any()
    assert not marked[exp == 0].any()
    assert set(np.unique(bad[marked]).tolist()) == {
        list(BAD_KINDS).index("wrong_type"),
        list(BAD_KINDS).index("unknown_arm"),
    }
    window = (idx >= 5000) & (idx < 10_000) & (exp == 1)
    assert _within_binomial(int(marked.sum()), int(window.sum()), 0.5)


def test_out_of_range_needs_a_contract():
    with pytest.raises(ConfigError) as err:
        sim(
            experiments=[ExperimentSpec(id="checkout")],
            inject=[BadRecords(fraction=0.1, kinds=("out_of_range",))],
        )
    assert err.value.problems[0].field == "inject[0].kinds"


# -- scenario validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("rate: -1", "rate", "> 0"),
        ("records: 10\nduration_s: 5", "", "records or duration_s"),
        ("colour: red", "colour", "unknown key"),
        (
            "experiments: [{id: x, metrics: {lat: {dist: gamma}}}]",
            "experiments[0].metrics.lat.dist",
            "gamma",
        ),
        (
            "experiments: [{id: x, metrics: {lat: {sigma: 1}}}]",
            "experiments[0].metrics.lat.dist",
            "missing",
        ),
        (
            "experiments: [{id: x, metrics: {lat: {dist: normal, mean: 1}}}]",
            "experiments[0].metrics.lat.sd",
            "missing",
        ),
        (
            "experiments: [{id: x, metrics: {e: {dist: binary, p: 1.5}}}]",
            "experiments[0].metrics.e.p",
            "<= 1",
        ),
        (
            "experiments: [{id: x, metrics: {l: {dist: lognormal, sigma: 1}}}]",
            "experiments[0].metrics.l",
            "median or mean",
        ),
        ("inject: [{kind: outage}]", "inject[0].kind", "outage"),
        ("inject: [{experiment: x}]", "inject[0].kind", "missing"),
        (
            "inject: [{kind: regression, experiment: x, arm: a, metric: m}]",
            "inject[0]",
            "exactly one of shift",
        ),
        (
            "inject: [{kind: regression, experiment: x, arm: a, metric: m, shift: 1, relative: 2}]",
            "inject[0]",
            "shift, relative",
        ),
        (
            "inject: [{kind: regression, experiment: x, metric: m, shift: 1}]",
            "inject[0].arm",
            "missing",
        ),
        (
            "inject: [{kind: regression, experiment: x, arm: a, metric: m, shift: 1, at_s: 5, until_s: 2}]",
            "inject[0].until_s",
            "greater than at_s",
        ),
        (
            "inject: [{kind: srm, experiment: x, allocation: {a: 0.5, b: 0.2}}]",
            "inject[0].allocation",
            "sum to 1",
        ),
        (
            "inject: [{kind: drift, experiment: x, feature: f, distribution: {dist: normal, mean: 1, sd: -1}}]",
            "inject[0].distribution.sd",
            ">= 0",
        ),
        (
            "inject: [{kind: bad_records, fraction: 0.1, kinds: [gibberish]}]",
            "inject[0].kinds[0]",
            "malformed_json",
        ),
        ("inject: [{kind: bad_records, fraction: 0}]", "inject[0].fraction", "> 0"),
    ],
)
def test_yaml_errors_name_the_field(text, field, words):
    with pytest.raises(ConfigError) as err:
        parse_scenario(text, where="bad.yaml")
    fields = {p.field: p.message for p in err.value.problems}
    assert field in fields, fields
    assert words in fields[field] or words in str(err.value), fields
    assert str(err.value).startswith("bad.yaml: ")


@pytest.mark.parametrize(
    ("inject", "field", "words"),
    [
        (
            {
                "kind": "regression",
                "experiment": "nope",
                "arm": "control",
                "metric": "error",
                "p": 0.5,
            },
            "inject[0].experiment",
            "not a simulated experiment",
        ),
        (
            {
                "kind": "regression",
                "experiment": "ranker-v2",
                "arm": "treatment",
                "metric": "error",
                "p": 0.5,
            },
            "inject[0].arm",
            "treatment-a",
        ),
        (
            {
                "kind": "regression",
                "experiment": "ranker-v2",
                "arm": "control",
                "metric": "errors",
                "p": 0.5,
            },
            "inject[0].metric",
            "latency_ms",
        ),
        (
            {
                "kind": "regression",
                "experiment": "ranker-v2",
                "arm": "control",
                "metric": "latency_ms",
                "p": 0.5,
            },
            "inject[0].p",
            "bernoulli",
        ),
        (
            {
                "kind": "srm",
                "experiment": "ranker-v2",
                "allocation": {"control": 0.5, "treatment-a": 0.5},
            },
            "inject[0].allocation",
            "each arm",
        ),
        (
            {"kind": "drift", "experiment": "ranker-v2", "feature": "qlen", "shift": 1},
            "inject[0].feature",
            "query_length",
        ),
        (
            {"kind": "bad_records", "fraction": 0.1, "experiment": "checkout"},
            "inject[0].experiment",
            "not a simulated",
        ),
    ],
)
def test_scenario_checked_against_the_experiments_file(inject, field, words):
    scenario = parse_scenario(
        orjson.dumps({"experiments": [{"id": "ranker-v2"}], "inject": [inject]}).decode()
    )
    with pytest.raises(ConfigError) as err:
        Simulation(scenario, EXPS, start_ts=START, where="s.yaml")
    p = err.value.problems[0]
    assert (p.where, p.field) == ("s.yaml", field)
    assert words in p.message


def test_unknown_experiment_in_the_scenario_is_named():
    with pytest.raises(ConfigError) as err:
        Simulation(Scenario(experiments=[ExperimentSpec(id="ranker")]), EXPS, start_ts=START)
    p = err.value.problems[0]
    assert p.field == "experiments[0].id" and "ranker-v2" in p.message


def test_python_dataclasses_validate_too():
    with pytest.raises(ValueError, match="exactly one of shift"):
        Regression(experiment="x", arm="a", metric="m")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Normal(mean=1, sd=-1)
    assert parse_scenario("inject: [{kind: srm, experiment: x, allocation: {a: 1}}]").inject == [
        Srm(experiment="x", allocation={"a": 1.0})
    ]


def test_demo_scenario_loads_against_the_demo_experiments():
    exps = load_experiments(ROOT / "config" / "demo.yaml")
    scenario = load_scenario(ROOT / "config" / "simulate-demo.yaml")
    s = Simulation(scenario, exps, start_ts=START, where="config/simulate-demo.yaml")
    assert s.experiment_ids == ("ranker-v2",)
    regressions = [i for i in scenario.inject if isinstance(i, Regression)]
    assert {r.metric for r in regressions} == {"latency_ms", "error"}
    assert len({r.arm for r in regressions}) == 1
    assert all(15 <= r.at_s <= 30 for r in regressions)
    first = orjson.loads(s.block(0).values[0])
    guarded = {g.metric for g in exps.experiments[0].guardrails}
    assert guarded == set(first["metrics"]) | set(first["features"])


# -- sinks: pacing and JSONL ------------------------------------------------------------------


def test_pacer_waits_bounded_and_rebases_when_far_behind():
    p = Pacer(rate=1000.0, max_sleep_s=0.25, max_lag_s=1.0)
    assert p.delay(0, now=100.0) == 0.0
    assert p.delay(100, now=100.0) == pytest.approx(0.1)
    assert p.delay(5000, now=100.0) == 0.25  # a long wait is cut into bounded sleeps
    assert p.delay(1000, now=101.5) == 0.0 and p.max_lag_seen_s == pytest.approx(0.5)
    assert p.delay(1000, now=103.0) == 0.0 and p.rebases == 1  # 2 s behind: give up the debt
    assert p.delay(1100, now=103.0) == pytest.approx(0.1)  # the schedule moved forward by 2 s
    assert p.chunk_records() == 20
    with pytest.raises(ValueError, match="positive"):
        Pacer(rate=0)


def test_write_jsonl_writes_every_record_and_can_pace():
    s = sim(records=1000, block_records=300)
    out = io.BytesIO()
    report = write_jsonl(s, out)
    lines = out.getvalue().splitlines()
    assert lines == list(s.values())
    assert (report.records, report.bad, report.first_ts) == (1000, 0, START)
    # paced at 1000/s with a fake clock: it sleeps about one second of event time in total
    now = [0.0]
    slept = []

    def sleep(x: float) -> None:
        slept.append(x)
        now[0] += x

    out = io.BytesIO()
    report = write_jsonl(s, out, pacer=Pacer(1000.0), clock=lambda: now[0], sleep=sleep)
    assert out.getvalue().splitlines() == lines
    assert sum(slept) == pytest.approx(0.98, abs=0.02) and max(slept) <= 0.25
    stopped = write_jsonl(s, io.BytesIO(), should_stop=lambda: True)
    assert stopped.records == 0


def test_kafka_partition_matches_aiokafka_default_partitioner():
    from aiokafka.partitioner import DefaultPartitioner

    for key in (b"u1", b"u123456", b"ranker-v2", b""):
        assert kafka_partition(key, 6) == DefaultPartitioner()(key, list(range(6)), [])


def test_cli_writes_a_file_deterministically(tmp_path):
    from armguard.daemon.cli import main

    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "seed: 3\nrate: 500\nexperiments: [{id: ranker-v2}]\n"
        "inject: [{kind: bad_records, fraction: 0.1, kinds: [wrong_type]}]\n"
    )
    exps = ROOT / "config" / "experiments.yaml"
    argv = ["simulate", "--experiments", str(exps), "--scenario", str(scenario)]
    argv += ["--records", "300", "--start-ts", str(START)]
    assert main([*argv, "--output", str(out1)]) == 0
    assert main([*argv, "--output", str(out2)]) == 0
    a = out1.read_bytes()
    assert a == out2.read_bytes() and len(a.splitlines()) == 300
    first = orjson.loads(a.splitlines()[0])
    assert first["ts"] == START and first["experiment"] == "ranker-v2"
    assert main([*argv, "--output", str(out2), "--seed", "4"]) == 0
    assert out2.read_bytes() != a
    assert main([*argv[:-4], "--duration-s", "0.1", "--output", str(out2)]) == 0
    assert len(out2.read_bytes().splitlines()) == 50


def test_cli_reports_scenario_errors_with_the_file(tmp_path, capsys):
    from armguard.daemon.cli import main

    scenario = tmp_path / "s.yaml"
    scenario.write_text("inject: [{kind: srm, experiment: ranker-v2, allocation: {control: 1}}]\n")
    argv = ["simulate", "--experiments", str(ROOT / "config" / "experiments.yaml")]
    assert main([*argv, "--scenario", str(scenario), "--records", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{scenario}: inject[0].allocation: give a share for each arm" in err


def test_murmur2_many_is_the_java_clients_hash():
    import random

    from aiokafka.partitioner import murmur2

    from armguard.daemon.simulate_sinks import murmur2_many

    rnd = random.Random(1)
    keys = [rnd.randbytes(rnd.randint(0, 23)) for _ in range(3000)] + [b"u1", b"ranker-v2"]
    assert murmur2_many(keys).tolist() == [murmur2(k) & 0xFFFFFFFF for k in keys]


def test_ingest_contract_gives_each_bad_kind_its_reason_and_accepts_the_good():
    """Cross-check with the ingest stage's pure data contract (daemon/contract.py)."""
    from armguard.daemon.contract import Contract
    from armguard.daemon.settings import IngestSettings

    exps = load_experiments(ROOT / "config" / "demo.yaml")
    s = Simulation(
        Scenario(seed=1, records=6000, inject=[BadRecords(fraction=0.3)]), exps, start_ts=START
    )
    contract = Contract(exps, IngestSettings())
    names = list(BAD_KINDS)
    seen = set()
    for b in s.batches():
        for value, bad, ts in zip(b.values, b.bad.tolist(), b.ts.tolist(), strict=True):
            verdict = contract.decode(value, now=ts)
            if bad < 0:
                assert type(verdict).__name__ == "Accepted", (value, verdict)
            else:
                assert verdict.reason == INGEST_REASONS[names[bad]], (names[bad], verdict)
                seen.add(names[bad])
    assert seen == set(names)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    rate=st.floats(0.5, 1e5),
    records=st.integers(0, 3000),
    block=st.integers(1, 1200),
    units=st.one_of(st.none(), st.integers(1, 10**7)),
)
def test_any_scenario_gives_ordered_well_formed_records(seed, rate, records, block, units):
    s = sim(seed=seed, rate=rate, records=records, block_records=block, units=units)
    batches = list(s.batches())
    assert sum(len(b) for b in batches) == records
    ts = np.concatenate([b.ts for b in batches]) if batches else np.array([])
    assert np.all(np.diff(ts) >= 0)
    for b in batches[:2]:
        for v in b.values[:20]:
            r = orjson.loads(v)
            assert r["experiment"] == "ranker-v2" and r["arm"] in EXPS.experiments[0].arms
            assert ("unit" in r) == (units is not None)
            if units is not None:
                assert 0 <= int(r["unit"][1:]) < units


def test_help_lists_every_option():
    from armguard.daemon.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["simulate"].format_help()
    for flag in (
        "--settings", "--experiments", "--scenario", "--records", "--duration-s", "--rate",
        "--pace", "--seed", "--start-ts", "--output", "--kafka", "--topic", "--key-by",
        "--partitions",
    ):  # fmt: skip
        assert flag in text
    assert "config/simulate-demo.yaml" in text


def test_cli_says_when_kafka_is_unreachable(monkeypatch, capsys):
    from armguard.daemon.cli import main

    monkeypatch.setenv("ARMGUARD_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    argv = ["simulate", "--experiments", str(ROOT / "config" / "demo.yaml")]
    assert main([*argv, "--kafka", "--records", "10"]) == 1
    assert "error: cannot reach Kafka at 127.0.0.1:1" in capsys.readouterr().err


def test_drift_of_a_bernoulli_feature_and_to_a_bernoulli():
    spec = ExperimentSpec(
        id="ranker-v2",
        features={"query_length": LogNormal(median=20, sigma=0.5), "b": Bernoulli(p=0.1)},
    )
    s = sim(
        experiments=[spec],
        records=20_000,
        units=None,
        inject=[
            Drift(experiment="ranker-v2", feature="b", at_s=10, distribution=Bernoulli(p=0.6)),
            Drift(
                experiment="ranker-v2",
                feature="query_length",
                at_s=10,
                distribution=Bernoulli(p=0.5),
            ),
        ],
    )
    recs = decoded(s)
    b = np.array([r["features"]["b"] for r in recs])
    q = np.array([r["features"]["query_length"] for r in recs])
    assert abs(b[:10_000].mean() - 0.1) < 0.02 and abs(b[10_000:].mean() - 0.6) < 0.03
    assert set(np.unique(q[10_000:]).tolist()) == {0.0, 1.0} and q[:10_000].min() > 1
    with pytest.raises(ConfigError) as err:
        sim(
            experiments=[spec],
            inject=[Drift(experiment="ranker-v2", feature="b", distribution=Normal(mean=1, sd=1))],
        )
    assert err.value.problems[0].field == "inject[0].distribution"
