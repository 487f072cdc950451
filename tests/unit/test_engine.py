"""The evaluate stage's pure engine: policy, operator commands, determinism, snapshots."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from armguard.daemon import commands as cmds
from armguard.daemon.engine import Engine
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.summary_record import arm_states
from armguard.detectors.summary import Summary
from tests.support.summaries import RANKER_EXPERIMENTS, regression_stream, summary_record

KEY = b"test-key"
CONFIG = RANKER_EXPERIMENTS


def stream(seed, **kw):
    return regression_stream(seed, **kw)


def run(engine, records, start=0):
    outs = []
    for i, value in enumerate(records):
        outs.extend(
            engine.apply_summary(value, topic="armguard.summaries", partition=0, offset=start + i)
        )
    return outs


def of_kind(outs, kind):
    return [orjson.loads(o.value) for o in outs if o.kind == kind]


@pytest.fixture
def config():
    return parse_experiments(CONFIG, where="test.yaml")


def engine_for(config):
    return Engine(config, evaluation_interval_s=10, hmac_key=KEY)


def test_healthy_arms_never_act(config):
    e = engine_for(config)
    outs = run(e, stream(1, n_batches=40))
    assert of_kind(outs, "killswitch") == []
    st = e.states["ranker"]
    assert st.desired() == {
        "state": "running",
        "arms": {"control": "running", "t1": "running", "t2": "running"},
    }
    assert {r["state"] for r in st.rows()} <= {"ok", "warn"}


def test_thin_data_is_inconclusive_never_a_kill(config):
    e = engine_for(config)
    # 100 records per arm with a huge regression: below min_samples (500), so nothing acts.
    outs = run(e, stream(2, n_batches=1, per_arm=100, bad_arm="t1", err_bad=0.5, lat_bad=3.0))
    assert of_kind(outs, "killswitch") == []
    assert {r["state"] for r in e.states["ranker"].rows()} == {"inconclusive"}


def test_regression_kills_only_the_bad_arm_once(config):
    e = engine_for(config)
    outs = run(e, stream(3, n_batches=40, bad_arm="t1", start_batch_bad=5))
    events = of_kind(outs, "killswitch")
    assert len(events) == 1, [ev["data"]["decision"]["guardrail"] for ev in events]
    ev = events[0]
    assert ev["specversion"] == "1.0" and ev["type"] == "armguard.killswitch.v1"
    assert ev["subject"] == "ranker"
    data = ev["data"]
    assert data["arms"] == {"control": "running", "t1": "killed", "t2": "running"}
    assert data["state"] == "running"
    d = data["decision"]
    assert d["arm"] == "t1" and d["action"] == "kill" and not d["shadow"]
    assert d["p_value"] <= d["alpha"] and d["lower"] > 0
    assert d["alpha"] == pytest.approx(0.05 / 6)  # 2 treatments x 3 sequential guardrails
    assert data["offsets"]["telemetry"][0]["first"] == 0
    assert data["config_version"] == config.version
    # The shadow guardrail recorded what it would have done, without an event of its own.
    decisions = of_kind(outs, "decisions")
    shadow = [x for x in decisions if x["data"]["decision"]["shadow"]]
    assert shadow and all(not x["data"]["state_changed"] for x in shadow)
    assert all(x["data"]["decision"]["arm"] == "t1" for x in decisions)


def test_same_input_same_outputs_bit_for_bit(config):
    recs = stream(4, n_batches=30, bad_arm="t2", start_batch_bad=3)
    a = [(o.kind, o.key, o.value) for o in run(engine_for(config), recs)]
    b = [(o.kind, o.key, o.value) for o in run(engine_for(config), recs)]
    assert a == b and any(k == "killswitch" for k, _, _ in a)


def test_restore_from_snapshot_reaches_the_same_decisions(config):
    recs = stream(5, n_batches=30, bad_arm="t1", start_batch_bad=4)
    full = engine_for(config)
    expected = [(o.kind, o.value) for o in run(full, recs) if o.kind != "state"]
    for cut in (1, 7, 12, 20):
        first = engine_for(config)
        got = [(o.kind, o.value) for o in run(first, recs[:cut]) if o.kind != "state"]
        snap = [o for o in first.snapshots() if o.kind == "state"][-1]
        second = engine_for(config)
        assert second.restore(snap.value) == "ranker"
        got += [(o.kind, o.value) for o in run(second, recs[cut:], start=cut) if o.kind != "state"]
        assert got == expected, f"diverged after restoring at {cut}"


def signed(command, **kw):
    base = {"user": "alice", "issued_at": 1_764_300_000.0, **kw}
    return orjson.dumps(cmds.sign(cmds.new_command(command, "ranker", **base), KEY))


def apply(e, value, offset=0, ts=1_764_300_001.0):
    return e.apply_command(
        value, topic="armguard.commands", partition=0, offset=offset, timestamp_s=ts
    )


def test_operator_resume_is_not_undone(config):
    e = engine_for(config)
    recs = stream(6, n_batches=60, bad_arm="t1", start_batch_bad=2)
    outs = run(e, recs[:30])
    assert e.states["ranker"].arm_states["t1"] == "killed"
    assert len(of_kind(outs, "killswitch")) == 1
    outs = apply(e, signed("resume", arm="t1", reason="known issue, fixed"))
    (ev,) = of_kind(outs, "killswitch")
    assert ev["data"]["arms"]["t1"] == "running" and ev["data"]["cause"] == "operator"
    # The regression goes on, but the daemon does not kill again what the operator resumed.
    outs = run(e, recs[30:], start=30)
    assert of_kind(outs, "killswitch") == []
    assert e.states["ranker"].arm_states["t1"] == "running"


def test_operator_kill_and_daemon_never_resumes(config):
    e = engine_for(config)
    outs = apply(e, signed("kill", arm="t2", reason="manual"))
    (ev,) = of_kind(outs, "killswitch")
    assert ev["data"]["arms"]["t2"] == "killed"
    assert ev["data"]["decision"]["operator"]["user"] == "alice"
    outs = run(e, stream(7, n_batches=20))
    assert of_kind(outs, "killswitch") == []
    assert e.states["ranker"].arm_states["t2"] == "killed"


def test_override_silences_until_it_expires(config):
    e = engine_for(config)
    recs = stream(8, n_batches=60, bad_arm="t1", start_batch_bad=0)
    # Silence the error guardrail for 100 s of event time, from the first data on.
    apply(e, signed("override", guardrail="error-proportion", duration_s=100.0))
    apply(e, signed("override", guardrail="latency_ms-mean", duration_s=100.0, id="o2"), offset=1)
    outs = run(e, recs[:18])  # up to t0 + 90 s: silenced
    assert of_kind(outs, "killswitch") == []
    assert {
        r["state"]
        for r in e.states["ranker"].rows()
        if r["guardrail"] != "latency-shadow" and r["arm"] == "t1"
    } == {"overridden"}
    outs = run(e, recs[18:30], start=18)  # past expiry: the standing breach fires now
    events = of_kind(outs, "killswitch")
    assert len(events) == 1 and events[0]["data"]["arms"]["t1"] == "killed"


@pytest.mark.parametrize(
    "value, reason",
    [
        (
            orjson.dumps(
                cmds.sign(
                    cmds.new_command("kill", "ranker", user="mallory", issued_at=1_764_300_000.0),
                    b"guess",
                )
            ),
            "bad_signature",
        ),
        (
            orjson.dumps(
                cmds.new_command("kill", "ranker", user="mallory", issued_at=1_764_300_000.0)
            ),
            "unsigned",
        ),
        (b"not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (None, "malformed"),
        (
            orjson.dumps(
                cmds.sign(
                    cmds.new_command("kill", "ranker", user="a", issued_at=1_763_000_000.0), KEY
                )
            ),
            "expired",
        ),
        (
            orjson.dumps(
                cmds.sign(
                    cmds.new_command("explode", "ranker", user="a", issued_at=1_764_300_000.0), KEY
                )
            ),
            "malformed",
        ),
        (
            orjson.dumps(
                cmds.sign(
                    cmds.new_command("kill", "nope", user="a", issued_at=1_764_300_000.0), KEY
                )
            ),
            "unknown_experiment",
        ),
        (
            orjson.dumps(
                cmds.sign(
                    cmds.new_command(
                        "kill", "ranker", arm="t9", user="a", issued_at=1_764_300_000.0
                    ),
                    KEY,
                )
            ),
            "unknown_arm",
        ),
    ],
)
def test_forged_or_malformed_commands_are_rejected_and_audited(config, value, reason):
    e = engine_for(config)
    outs = apply(e, value, offset=41)
    assert of_kind(outs, "killswitch") == []
    (audit,) = of_kind(outs, "decisions")
    assert audit["data"]["kind"] == "command_rejected"
    assert audit["data"]["reason"] == reason
    assert audit["data"]["offset"] == {"topic": "armguard.commands", "partition": 0, "offset": 41}
    assert e.counters["commands_rejected"] == 1 and e.counters["commands_applied"] == 0
    assert e.states.get("ranker") is None or e.states["ranker"].arm_states["t1"] == "running"


def test_a_replayed_command_id_is_rejected(config):
    e = engine_for(config)
    value = signed("pause", arm="t1", id="same")
    assert of_kind(apply(e, value), "killswitch")
    (audit,) = of_kind(apply(e, value, offset=1), "decisions")
    assert audit["data"]["reason"] == "replayed"


def test_commands_need_a_configured_key(config):
    e = Engine(config, hmac_key=None)
    (audit,) = of_kind(apply(e, signed("kill")), "decisions")
    assert audit["data"]["reason"] == "no_key"


def test_unknown_experiment_and_garbage_summaries_are_counted(config):
    e = engine_for(config)
    other = summary_record(
        "other", {"control": {"error": [0.0]}}, t0=0, t1=1, offset_first=0, offset_last=0
    )
    assert run(e, [other, b"{", b"[]"]) == []
    assert e.counters["summaries_unknown_experiment"] == 1
    assert e.counters["summaries_invalid"] == 2


def test_srm_breach_acts_on_the_experiment(config):
    exp = parse_experiments(
        CONFIG.replace("action: alert, min_samples: 1000", "action: pause, min_samples: 1000"),
        where="t.yaml",
    )
    e = engine_for(exp)
    rng = np.random.default_rng(9)
    recs = []
    for b in range(30):
        arms = {
            a: {"error": (rng.random(n) < 0.01).astype(float)}
            for a, n in (("control", 600), ("t1", 400), ("t2", 400))
        }
        recs.append(
            summary_record(
                "ranker", arms, t0=b * 5.0, t1=b * 5.0 + 5, offset_first=b, offset_last=b
            )
        )
    events = of_kind(run(e, recs), "killswitch")
    assert len(events) == 1
    assert events[0]["data"]["state"] == "paused" and events[0]["data"]["cause"] == "srm"


DRIFT_CONFIG = """
experiments:
  - id: feat
    control: control
    arms: {control: 0.5, treatment: 0.5}
    srm: {enabled: false}
    guardrails:
      - {metric: f, source: feature, test: drift, mode: control, consecutive: 2, min_samples: 200,
         action: pause, expected_run_length: 10000}
"""


def feature_stream(seed, *, n_batches, shift_at, per_arm=500):
    rng = np.random.default_rng(seed)
    recs = []
    for b in range(n_batches):
        arms = {}
        for arm in ("control", "treatment"):
            x = rng.lognormal(3.0, 0.5, per_arm)
            if arm == "treatment" and b >= shift_at:
                x = x * 1.5
            s = Summary()
            s.update_many(x)
            arms[arm] = {"count": per_arm, "metrics": {}, "features": {"f": s.to_state()}}
        t = 1_764_300_000.0 + b * 5
        recs.append(
            orjson.dumps(
                {
                    "v": 1,
                    "experiment": "feat",
                    "offsets": [],
                    "span": {"min_ts": t, "max_ts": t + 5},
                    "arms": arms,
                }
            )
        )
    return recs


def test_feature_drift_against_control_pauses_after_consecutive_alarms():
    e = engine_for(parse_experiments(DRIFT_CONFIG, where="t.yaml"))
    recs = feature_stream(10, n_batches=60, shift_at=30)
    before = run(e, recs[:30])
    assert of_kind(before, "killswitch") == []  # no drift, no alarm over 15 intervals
    after = run(e, recs[30:], start=30)
    (ev,) = of_kind(after, "killswitch")
    d = ev["data"]["decision"]
    assert d["test"] == "drift" and d["arm"] == "treatment" and d["action"] == "pause"
    assert d["score"] > d["threshold"]
    assert ev["data"]["arms"]["treatment"] == "paused"


CHANGE_CONFIG = """
experiments:
  - id: chg
    control: control
    arms: {control: 0.5, treatment: 0.5}
    srm: {enabled: false}
    guardrails:
      - {metric: latency_ms, test: change, consecutive: 2, min_samples: 100, action: kill}
"""


def test_change_in_an_arm_level_kills_after_consecutive_alarms():
    e = engine_for(parse_experiments(CHANGE_CONFIG, where="t.yaml"))
    rng = np.random.default_rng(12)
    recs = []
    for b in range(400):
        arms = {}
        for arm in ("control", "treatment"):
            shift = 1.15 if (arm == "treatment" and b >= 240) else 1.0
            arms[arm] = {"latency_ms": rng.lognormal(4.0, 0.3, 200) * shift}
        t = 1_764_300_000.0 + b * 5
        recs.append(summary_record("chg", arms, t0=t, t1=t + 5, offset_first=b, offset_last=b))
    quiet = run(e, recs[:240])
    assert of_kind(quiet, "killswitch") == []
    events = of_kind(run(e, recs[240:], start=240), "killswitch")
    assert len(events) == 1
    d = events[0]["data"]["decision"]
    # RankCUSUM restarts on its alarm (it relearns the new level), so the score is fresh here.
    assert d["test"] == "change" and d["arm"] == "treatment" and d["threshold"] > 0


def test_stashed_snapshots_restore_lazily_to_the_same_decisions(config):
    recs = stream(13, n_batches=30, bad_arm="t1", start_batch_bad=4)
    full = engine_for(config)
    expected = [(o.kind, o.value) for o in run(full, recs) if o.kind != "state"]
    first = engine_for(config)
    got = [(o.kind, o.value) for o in run(first, recs[:10]) if o.kind != "state"]
    snap = [o for o in first.snapshots() if o.kind == "state"][-1]
    second = engine_for(config)
    assert second.stash("ranker", snap.value) and not second.stash("unknown", snap.value)
    assert second.experiment_ids() == ["ranker"] and not second.states
    got += [(o.kind, o.value) for o in run(second, recs[10:], start=10) if o.kind != "state"]
    assert got == expected and not second.pending


# -- batched evaluation: apply_summaries ------------------------------------------------------

MANY_DRIFT_CONFIG = "experiments:\n" + "".join(
    f"""
  - id: exp{i}
    control: control
    arms: {{control: 0.34, t1: 0.33, t2: 0.33}}
    srm: {{enabled: false}}
    guardrails:
      - {{metric: f, source: feature, test: drift, mode: control, consecutive: 2,
         min_samples: 200, action: pause, expected_run_length: {20 if i % 3 == 0 else 10000}}}
      - {{name: f-ks, metric: f, source: feature, test: drift, mode: control, consecutive: 1,
         min_samples: 200, action: alert, expected_run_length: 50}}
      - {{name: f-ref, metric: f, source: feature, test: drift, mode: reference, min_samples: 200,
         action: alert}}
      - {{metric: latency_ms, test: anomaly, min_samples: 200, action: alert}}
"""
    for i in range(8)
)


def many_experiment_records(seed, n_batches):
    """Interleaved summary records of 8 experiments (some skip batches, a few arms shift)."""
    rng = np.random.default_rng(seed)
    recs = []
    for b in range(n_batches):
        for i in rng.permutation(8):
            for _ in range(int(rng.integers(0, 3))):  # 0-2 records of this experiment
                arms = {}
                for arm in ("control", "t1", "t2"):
                    if rng.random() < 0.1:
                        continue  # an arm without data this time
                    n = int(rng.integers(20, 300))
                    shift = 1.4 if arm == "t1" and i % 2 and b > n_batches // 2 else 1.0
                    f = Summary.from_values(rng.lognormal(3.0, 0.5, n) * shift)
                    lat = Summary.from_values(rng.lognormal(4.0, 0.3, n))
                    arms[arm] = {
                        "count": n,
                        "metrics": {"latency_ms": lat.to_state()},
                        "features": {"f": f.to_state()},
                    }
                t = 1_764_300_000.0 + b * 4 + float(rng.uniform(0, 4))
                doc = {"v": 1, "experiment": f"exp{i}", "offsets": [], "span": {"max_ts": t}}
                recs.append(orjson.dumps({**doc, "arms": arms}))
        if b % 7 == 3:
            recs.append(b"{not json")  # invalid records are counted and skipped in place
            recs.append(orjson.dumps({"experiment": "nobody", "arms": {}}))
    return recs


@pytest.mark.parametrize("wave", [2, 1024])
@pytest.mark.parametrize(
    ("interval_s", "n_batches"),
    # 10 s: the reference drift guardrails never complete their windows (24 + 6 intervals);
    # 1 s: they do, evaluate and alert once t1 of every other experiment shifts.
    [(10.0, 40), (1.0, 64)],
)
def test_apply_summaries_equals_applying_records_one_by_one(
    monkeypatch, wave, interval_s, n_batches
):
    import armguard.daemon.engine as engine_module

    monkeypatch.setattr(engine_module, "_WAVE", wave)  # waves cut mid-run, or one per run
    config = parse_experiments(MANY_DRIFT_CONFIG, where="t.yaml")
    recs = many_experiment_records(40, n_batches=n_batches)

    def engine_for(config):
        return Engine(config, evaluation_interval_s=interval_s, hmac_key=KEY)

    one_by_one = engine_for(config)
    expected = []
    for off, value in enumerate(recs):
        outs = one_by_one.apply_summary(value, topic="s", partition=0, offset=off)
        expected.append([(o.kind, o.key, o.value) for o in outs])
    snaps = [(o.key, o.value) for o in one_by_one.snapshots()]
    assert sum(k == "killswitch" for outs in expected for k, _, _ in outs) >= 2
    assert sum(k == "decisions" for outs in expected for k, _, _ in outs) >= 10
    reference = [
        orjson.loads(v)["data"]["decision"]
        for outs in expected
        for k, _, v in outs
        if k == "decisions" and b'"f-ref"' in v
    ]
    if interval_s == 1.0:
        assert len(reference) >= 3 and all(d["score"] > d["threshold"] for d in reference)
    else:
        assert reference == []
    rng = np.random.default_rng(41)
    for sizes in ([len(recs)], [1] * 50 + [len(recs)], rng.integers(1, 60, 200).tolist()):
        batched = engine_for(config)
        got, start = [], 0
        for size in sizes:
            run_ = [(v, "s", 0, start + j) for j, v in enumerate(recs[start : start + size])]
            got += [
                [(o.kind, o.key, o.value) for o in outs] for outs in batched.apply_summaries(run_)
            ]
            start += size
            if start >= len(recs):
                break
        assert got == expected
        assert [(o.key, o.value) for o in batched.snapshots()] == snaps
        assert batched.counters == one_by_one.counters


def test_apply_summaries_batches_drift_updates_across_experiments(monkeypatch):
    from armguard.detectors.two_sample_drift import TwoSampleDrift
    from armguard.detectors.window_drift import WindowDrift

    sizes = {TwoSampleDrift: [], WindowDrift: []}

    def spy_on(cls):
        original = cls.update_many.__func__

        def spy(cls, detectors, inputs, **kw):
            sizes[cls].append(len(detectors))
            return original(cls, detectors, inputs, **kw)

        monkeypatch.setattr(cls, "update_many", classmethod(spy))

    spy_on(TwoSampleDrift)
    spy_on(WindowDrift)
    config = parse_experiments(MANY_DRIFT_CONFIG, where="t.yaml")
    engine = engine_for(config)
    recs = many_experiment_records(42, n_batches=12)
    engine.apply_summaries([(v, "s", 0, i) for i, v in enumerate(recs)])
    # 8 experiments x 2 treatments x 2 control-mode guardrails tick together; the reference
    # drift guardrail runs on all 3 arms of the 8.
    assert max(sizes[TwoSampleDrift]) >= 16 and sum(sizes[TwoSampleDrift]) >= 100
    assert max(sizes[WindowDrift]) >= 16 and sum(sizes[WindowDrift]) >= 64


def test_arm_data_absorb_equals_merge_in_and_takes_the_summaries():
    from armguard.daemon.guardrails import ArmData

    rng = np.random.default_rng(43)

    def arm(*names):
        return ArmData(
            count=10,
            metrics={n: Summary.from_values(rng.lognormal(0, 1, 50)) for n in names},
            features={"f": Summary.from_values(rng.normal(0, 1, 50))},
        )

    first, second = arm("a", "b"), arm("b", "c")
    merged, absorbed = ArmData(), ArmData()
    for data in (first, second):
        merged.merge_in(data)
    absorbed.absorb(first)
    new_c = second.metrics["c"]
    absorbed.absorb(second)
    assert absorbed.to_state() == merged.to_state()
    assert absorbed.metrics["c"] is new_c  # taken, not copied
    assert merged.metrics["c"] is not new_c


@pytest.mark.parametrize("enabled", [True, False])
def test_apply_summaries_restores_the_gc_when_a_run_fails(monkeypatch, enabled):
    # The run pauses the cyclic GC (5488ee7); an unknown failure inside a wave must not leave it
    # off for the rest of the process, and a caller that had paused it keeps it paused.
    import gc

    from armguard.detectors.window_drift import WindowDrift

    def fail(cls, detectors, inputs, **kw):
        assert not gc.isenabled()
        raise RuntimeError("boom")

    monkeypatch.setattr(WindowDrift, "update_many", classmethod(fail))
    config = parse_experiments(MANY_DRIFT_CONFIG, where="t.yaml")
    engine = Engine(config, evaluation_interval_s=1.0, hmac_key=KEY)
    recs = many_experiment_records(44, n_batches=40)
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with pytest.raises(RuntimeError, match="boom"):
            engine.apply_summaries([(v, "s", 0, i) for i, v in enumerate(recs)])
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_interval_summaries_share_nothing_with_the_cumulative_ones():
    # b10d8d0: the interval takes the decoded record's Summaries instead of copying them. That is
    # safe only while nothing else holds them: the cumulative data must hold copies, so merging
    # the next record into the interval (in place) cannot reach it, nor one arm another's.
    config = parse_experiments(MANY_DRIFT_CONFIG, where="t.yaml")
    engine = Engine(config, evaluation_interval_s=1_000.0, hmac_key=KEY)  # no tick: one interval
    recs = many_experiment_records(45, n_batches=6)
    engine.apply_summaries([(v, "s", 0, i) for i, v in enumerate(recs)])

    def arrays(s):
        h = s.histogram
        return [h._pos.counts, h._neg.counts]

    seen = []
    for st in engine.states.values():
        assert st.interval
        for arm, data in st.interval.items():
            for kind in ("metrics", "features"):
                for name, s in getattr(data, kind).items():
                    cumulative = getattr(st.arms[arm], kind)[name]
                    assert s is not cumulative
                    assert s.to_state() == cumulative.to_state()  # one interval so far
                    seen.append(s)
                    seen.append(cumulative)
    assert len({id(s) for s in seen}) == len(seen)
    buffers = [a for s in seen for a in arrays(s) if a.size]
    for i, a in enumerate(buffers):
        assert not any(np.shares_memory(a, b) for b in buffers[i + 1 :])


# -- snapshots that cannot be restored ---------------------------------------------------------
def _killed_with_history(config):
    """An engine whose ranker experiment has t1 killed by its guardrails, t2 killed by an
    operator, an override and seen commands; and its snapshot."""
    e = engine_for(config)
    recs = stream(6, n_batches=30, bad_arm="t1", start_batch_bad=2)
    run(e, recs[:25])
    apply(e, signed("kill", arm="t2", reason="manual", id="k2"), offset=1)
    apply(e, signed("override", guardrail="error-proportion", duration_s=1e6, id="o1"), offset=2)
    st = e.states["ranker"]
    assert st.arm_states == {"control": "running", "t1": "killed", "t2": "killed"}
    snap = orjson.loads(e.snapshots()[-1].value)
    return e, recs, snap


def _break_a_detector(snap):
    runners = snap["internal"]["runners"]
    key = next(iter(runners))
    runners[key]["detector"] = {"not": "a detector state"}
    return snap


@pytest.mark.parametrize("path", ["summary", "idle", "command"])
def test_an_unreadable_snapshot_keeps_kills_and_operator_history_and_is_handed_over(config, path):
    _, recs, snap = _killed_with_history(config)
    raw = orjson.dumps(_break_a_detector(snap))
    second = engine_for(config)
    assert second.stash("ranker", raw, (3, 1234, 1_764_300_000_000))
    if path == "summary":
        run(second, recs[25:26], start=25)
        # The summary is applied, not counted as invalid.
        assert second.counters["summaries"] == 1 and second.counters["summaries_invalid"] == 0
    elif path == "idle":
        assert second.restore_pending(10) == 0  # did not raise
    else:
        outs = apply(second, signed("pause", arm="t2", id="k2"), offset=9)  # a replay
        (audit,) = of_kind(outs, "decisions")
        assert audit["data"]["reason"] == "replayed"  # the seen command ids were kept
    assert second.counters["snapshots_unreadable"] == 1 and not second.pending
    st = second.states["ranker"]
    # Kept: the kills (the daemon never resumes; only an operator does), the override, the
    # command ids, the revision and decision sequence, the status.
    assert st.arm_states == {"control": "running", "t1": "killed", "t2": "killed"}
    assert st.overrides == snap["internal"]["overrides"] and st.overrides
    assert st.seen_commands == snap["internal"]["seen_commands"]
    assert st.decision_seq >= snap["internal"]["decision_seq"] > 0
    assert st.revision >= snap["revision"] > 0
    assert snap["status"]["last_decision"] is not None
    if path == "idle":
        assert st.last_decision == snap["status"]["last_decision"]
    # Fresh: the data, the detectors and the offsets that fed them.
    fed = {"armguard.summaries:0": [25, 25]} if path == "summary" else {}
    assert st.summary_offsets == fed and snap["internal"]["summary_offsets"] != fed
    assert path == "summary" or st.telemetry_offsets == {}
    assert all(
        r["state"] == "inconclusive" for r in st.rows() if r["guardrail"] != "error-proportion"
    )
    (u,) = second.take_unreadable()
    assert u.experiment == "ranker" and u.value == raw and u.source == (3, 1234, 1_764_300_000_000)
    assert u.reason == "KeyError: 'params'"  # the broken detector state's missing field
    assert u.kept == ("desired", "revision", "overrides", "seen_commands", "status")
    assert second.take_unreadable() == []


def test_an_unreadable_snapshot_goes_on_to_the_same_decisions_as_a_fresh_detector_state(config):
    # After the salvage the experiment is the fresh one plus what was kept: the same records
    # give a salvaged engine and an engine given only those parts the same decisions.
    _, recs, snap = _killed_with_history(config)
    salvaged = engine_for(config)
    salvaged.stash("ranker", orjson.dumps(_break_a_detector(snap)))
    out_salvaged = run(salvaged, recs[25:], start=25)
    kept_only = engine_for(config)
    for k in ("arms", "interval", "runners"):
        snap["internal"][k] = {}
    snap["internal"].update(next_tick=None, srm=None, summary_offsets={}, telemetry_offsets={})
    kept_only.stash("ranker", orjson.dumps(snap))
    out_kept = run(kept_only, recs[25:], start=25)
    assert kept_only.counters["snapshots_unreadable"] == 0
    assert [(o.kind, o.value) for o in out_salvaged if o.kind != "state"] == [
        (o.kind, o.value) for o in out_kept if o.kind != "state"
    ]


def test_snapshot_parts_are_kept_each_whole_or_not_at_all(config):
    _, _, snap = _killed_with_history(config)
    snap = _break_a_detector(snap)
    snap["desired"]["arms"]["t1"] = "exploded"  # not a state: no desired state is kept
    snap["internal"]["seen_commands"] = ["k2", 7]
    e = engine_for(config)
    e.stash("ranker", orjson.dumps(snap))
    e.restore_pending(1)
    st = e.states["ranker"]
    assert st.arm_states == {"control": "running", "t1": "running", "t2": "running"}
    assert st.seen_commands == [] and st.overrides
    (u,) = e.take_unreadable()
    assert u.kept == ("revision", "overrides", "status") and u.source is None


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b'{"experiment": "ranker"}'])
def test_a_snapshot_that_is_not_one_starts_the_experiment_fresh(config, raw):
    e = engine_for(config)
    e.stash("ranker", raw)
    assert e.restore_pending(1) == 0
    st = e.states["ranker"]
    assert st.desired() == engine_for(config).state_for("ranker").desired()
    (u,) = e.take_unreadable()
    assert u.kept == () and u.value == raw and u.reason


def test_dropping_a_partition_forgets_its_unreadable_snapshots(config):
    e = engine_for(config)
    e.stash("ranker", b"{")
    e.restore_pending(1)
    assert e.unreadable
    e.drop({"ranker"})
    assert e.take_unreadable() == [] and "ranker" not in e.states


# -- malformed summary records never stop the engine -------------------------------------------
FUZZ_CONFIG = """
experiments:
  - id: fz
    control: control
    arms: {control: 0.5, treatment: 0.5}
    guardrails:
      - {metric: f, source: feature, test: drift, mode: reference}
      - {name: g, metric: f, source: feature, test: drift, mode: control}
      - {metric: m, test: mean, harmful: increase, min_samples: 50}
      - {name: c, metric: m, test: change}
      - {name: a, metric: m, test: anomaly}
"""


def _nonzero_store(store):
    first, counts = store
    keys = list(range(first, first + len(counts))) if isinstance(first, int) else first
    kept = [(k, c) for k, c in zip(keys, counts, strict=True) if c]
    return [k for k, _ in kept], [c for _, c in kept]


def _fuzz_record(rng, t, version):
    states = {
        arm: {
            "m": Summary.from_values(rng.normal(10.0, 1.0, 100)).to_state(),
            "f": Summary.from_values(rng.lognormal(0.0, 1.0, 300)).to_state(),
        }
        for arm in ("control", "treatment")
    }
    head = {
        "experiment": "fz",
        "offsets": [{"topic": "tel", "partition": 0, "first": 0, "last": 9}],
        "span": {"min_ts": t - 5.0, "max_ts": t},
    }
    if version == 1:
        arms = {
            arm: {"count": 300, "metrics": {"m": s["m"]}, "features": {"f": s["f"]}}
            for arm, s in states.items()
        }
        return {"v": 1, **head, "arms": arms}
    rows = {k: [] for k in ("arm", "name", "count", "sum", "m2", "min", "max", "zero")}
    pos = [[], [], []]
    for a, arm in enumerate(states):
        for j, name in enumerate(("m", "f")):
            s = states[arm][name]
            for key, value in zip(
                ("arm", "name", "count", "sum", "m2", "min", "max", "zero"),
                (a, j, s["n"], s["sum"], s["m2"], s["min"], s["max"], s["h"]["z"]),
                strict=True,
            ):
                rows[key].append(value)
            keys, counts = _nonzero_store(s["h"]["p"])
            pos[0].append(len(keys))
            pos[1] += keys
            pos[2] += counts
    rows["pos"] = pos
    return {
        "v": 2,
        **head,
        "arms": list(states),
        "count": [300, 300],
        "ra": 0.01,
        "mb": 2048,
        "names": [["metrics", "m"], ["features", "f"]],
        "rows": rows,
    }


_ODD = [
    0,
    -1,
    10**400,
    1.5,
    -1e308,
    1e308,
    2**63 - 1,
    -(2**63),
    2**64,
    10**30,
    "x",
    None,
    True,
    [],
    {},
    [1, 2],
    [[1], [2]],
    1e-300,
    float("nan"),
    float("inf"),
]


def _paths(obj, at=()):
    if at:
        yield at
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        yield from _paths(v, (*at, k))


@pytest.mark.parametrize("version", [1, 2])
def test_malformed_summary_records_are_counted_and_never_stop_the_engine(version):
    """Seeded mutations of valid summary records (a field replaced by a value of another type
    or range: negative, huge, beyond 64 bits, NaN, a list where an object belongs, ...) among
    valid records: applying them never raises (it stopped the evaluate stage at every
    restart, on the same record), every record is applied or counted invalid, and what the
    engine accepted always snapshots, restores and goes on."""
    import json
    import random

    config = parse_experiments(FUZZ_CONFIG, where="test.yaml")
    rng = np.random.default_rng(99 + version)
    pick = random.Random(7 + version)
    valid = [_fuzz_record(rng, 10.0 * k + 5.0, version) for k in range(80)]
    engine = Engine(config, evaluation_interval_s=10.0)
    engine.apply_summaries(
        [(orjson.dumps(r), "armguard.summaries", 0, i) for i, r in enumerate(valid[:30])]
    )
    offset = 30
    for k in range(30, 80):
        bad = orjson.loads(orjson.dumps(valid[k]))
        paths = list(_paths(bad))
        for _ in range(pick.randint(1, 3)):
            path = pick.choice(paths)
            target = bad
            try:
                for key in path[:-1]:
                    target = target[key]
                target[path[-1]] = pick.choice(_ODD)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation replaced a container on this path
        batch = [json.dumps(bad).encode(), orjson.dumps(valid[k])]  # json: big ints, NaN
        before = engine.counters["summaries"] + engine.counters["summaries_invalid"]
        engine.apply_summaries(
            [(v, "armguard.summaries", 0, offset + i) for i, v in enumerate(batch)]
        )
        offset += 2
        assert engine.counters["summaries"] + engine.counters["summaries_invalid"] == before + 2
        for out in engine.snapshots():
            restored = Engine(config, evaluation_interval_s=10.0)
            assert restored.restore(out.value) == "fz"
    # Most mutations are caught; the valid records between them were all applied.
    assert engine.counters["summaries_invalid"] >= 25
    assert engine.counters["summaries"] >= 30 + 50
    assert engine.counters["snapshots_unreadable"] == 0


def test_a_summary_of_another_accuracy_is_invalid_not_a_crash():
    # Merging it into the experiment's data raised ValueError out of apply_summaries.
    config = parse_experiments(FUZZ_CONFIG, where="test.yaml")
    rng = np.random.default_rng(5)
    engine = Engine(config, evaluation_interval_s=10.0)
    records = [_fuzz_record(rng, 10.0 * k + 5.0, 1) for k in range(6)]
    odd = records[3]["arms"]["treatment"]["features"]["f"]
    odd["h"]["ra"] = 0.02  # same buckets read at another accuracy: a valid Summary on its own
    assert Summary.from_state(odd).relative_accuracy == 0.02
    engine.apply_summaries(
        [(orjson.dumps(r), "armguard.summaries", 0, i) for i, r in enumerate(records)]
    )
    assert engine.counters["summaries_invalid"] == 1 and engine.counters["summaries"] == 5
    arms = engine.states["fz"].arms
    assert {s.relative_accuracy for a in arms.values() for s in a.features.values()} == {0.01}
    assert arms["control"].count == 5 * 300  # nothing of the refused record was merged


# Values a snapshot may hold in the parts the engine keeps using after a restore (or a salvage)
# that no armguard writes and that failed later, out of the engine: at the next snapshot
# (orjson encodes no integer beyond 64 bits), the next event (no RFC 3339 time past year 9999),
# the next comparison of event times, or the next offsets range.
_BAD_KEPT_PARTS = [
    (("revision",), 1e30),
    (("revision",), -3),
    (("revision",), True),
    (("internal", "decision_seq"), 1e30),
    (("internal", "decision_seq"), -1),
    (("desired", "state"), "stopped"),
    (("desired", "arms", "t1"), "stopped"),
    (("status", "updated_ts"), "yesterday"),
    (("status", "updated_ts"), 1e300),
    (("status", "updated_ts"), -1e12),
    (("internal", "next_tick"), "soon"),
    (("internal", "overrides"), {"error-proportion": "inf"}),
    (("internal", "summary_offsets"), {"no-partition": [1, 2]}),
    (("internal", "summary_offsets"), {"armguard.summaries:0": ["a", "b"]}),
    (("internal", "summary_offsets"), {"armguard.summaries:0": [1]}),
    (("internal", "telemetry_offsets"), {"tel:x": [1, 2]}),
    # a proportion's cumulative summary with a sum outside [0, count]: its test raised
    (("internal", "arms", "t1", "metrics", "error", "sum"), -5.0),
    (("internal", "arms", "control", "metrics", "error", "sum"), 1e9),
    # an arm's unit count that is negative or not an integer: the SRM test raised
    (("internal", "arms", "control", "count"), -9600),
    (("internal", "arms", "control", "count"), 1e30),
]


@pytest.mark.parametrize("broken", [False, True], ids=["detectors-valid", "detector-broken"])
@pytest.mark.parametrize("path,value", _BAD_KEPT_PARTS, ids=lambda v: repr(v)[:24])
def test_a_snapshot_part_of_the_wrong_type_or_range_is_not_kept(config, path, value, broken):
    _, recs, snap = _killed_with_history(config)
    if broken:
        _break_a_detector(snap)
    at = snap
    for k in path[:-1]:
        at = at[k]
    at[path[-1]] = value
    e = engine_for(config)
    e.stash("ranker", orjson.dumps(snap))
    e.restore_pending(1)
    (u,) = e.take_unreadable()  # unreadable, not restored with a value that fails later
    part = {"decision_seq": "revision", "updated_ts": "status"}.get(path[-1], path[-1])
    part = {"state": "desired", "t1": "desired"}.get(part, part)
    assert part not in u.kept  # the offsets and next tick are never kept
    run(e, recs[25:], start=25)
    apply(e, signed("kill", arm="t1", reason="x", id="k9"), offset=5, ts=1_764_400_001.0)
    apply(e, signed("resume", reason="x", id="k10"), offset=6, ts=1_764_400_002.0)
    for o in e.snapshots():  # encoded, and restores
        again = engine_for(config)
        again.stash("ranker", o.value)
        again.restore_pending(1)
        assert again.take_unreadable() == []


@pytest.mark.parametrize("first", [4, 0])
@pytest.mark.parametrize("max_ts", [1e300, -1e300, 253_402_300_800.0, -1e12, -62_135_596_801.0])
def test_a_summary_with_an_event_time_no_event_can_carry_is_applied_without_it(max_ts, first):
    # A finite span.max_ts past year 9999 (or before year 1) was taken as the event time; the
    # next decision's RFC 3339 time then raised OverflowError/ValueError out of
    # apply_summaries, stopping the stage at every restart on that record.
    config = parse_experiments(FUZZ_CONFIG, where="test.yaml")
    rng = np.random.default_rng(11)
    records = [_fuzz_record(rng, 10.0 * k + 5.0, 2) for k in range(8)]
    engine = Engine(config, evaluation_interval_s=10.0, hmac_key=KEY)
    engine.apply_summaries([(orjson.dumps(r), "s", 0, i) for i, r in enumerate(records[:first])])
    st = engine.state_for("fz")
    before = st.last_ts
    records[first]["span"]["max_ts"] = max_ts
    engine.apply_summaries([(orjson.dumps(records[first]), "s", 0, first)])
    assert engine.counters["summaries"] == first + 1 and st.last_ts == before
    kill = cmds.new_command("kill", "fz", arm="treatment", user="a", issued_at=1_764_300_000.0)
    (audit,) = of_kind(apply(engine, orjson.dumps(cmds.sign(kill, KEY)), 1), "decisions")
    assert audit["data"]["kind"] == "command"
    rest = records[first + 1 :]
    engine.apply_summaries([(orjson.dumps(r), "s", 0, 10 + i) for i, r in enumerate(rest)])
    assert engine.counters["summaries"] == first + 1 + len(rest)
    # The command's time stood in where there was none yet.
    assert st.last_ts == (1_764_300_001.0 if first == 0 else records[-1]["span"]["max_ts"])


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("bad_sum", [5e302, -1.7976931348623157e308])
def test_a_summary_whose_moments_overflow_the_arms_data_is_invalid(version, bad_sum):
    # A Summary state with finite moments, read on its own, whose merge into the data so far
    # overflows (the means' difference squared): the arm's m2 became inf, its snapshot held
    # null there and was unreadable at the next restart (the experiment's data lost).
    config = parse_experiments(FUZZ_CONFIG, where="test.yaml")
    rng = np.random.default_rng(12)
    records = [_fuzz_record(rng, 10.0 * k + 5.0, version) for k in range(6)]
    if version == 1:
        m = records[3]["arms"]["treatment"]["metrics"]["m"]
        m["sum"], m["mean"] = bad_sum, bad_sum / m["n"]
    else:
        records[3]["rows"]["sum"][2] = bad_sum  # treatment's m
    assert Summary.from_state(arm_states(records[3])["treatment"]["metrics"]["m"]).m2 >= 0
    engine = Engine(config, evaluation_interval_s=10.0)
    engine.apply_summaries([(orjson.dumps(r), "s", 0, i) for i, r in enumerate(records)])
    assert engine.counters["summaries_invalid"] == 1 and engine.counters["summaries"] == 5
    st = engine.states["fz"]
    for data in (*st.arms.values(), *st.interval.values()):
        for s in (*data.metrics.values(), *data.features.values()):
            assert math.isfinite(s.m2) and math.isfinite(s.sum) and math.isfinite(s.mean)
    (out,) = engine.snapshots()
    again = Engine(config, evaluation_interval_s=10.0)
    again.stash("fz", out.value)
    again.restore_pending(1)
    assert again.take_unreadable() == []


def test_a_proportion_metric_summary_outside_0_1_is_invalid_not_a_crash(config):
    # Ingest summarises any value within the metric's range (|x| <= 1e100 when none is
    # configured, as for `error` here), so one telemetry value of 3 for a proportion metric
    # makes a valid Summary with sum > count. ProportionDifferenceTest then raised ValueError
    # out of apply_summaries, on that record at every restart (or, merged, on every later
    # record of the experiment).
    recs = stream(6, n_batches=30)
    e = engine_for(config)
    run(e, recs[:10])
    for k, fill, value in ((10, 1.0, 3.0), (11, 0.0, -1.0)):
        bad = orjson.loads(recs[k])
        arm = bad["arms"]["t1"]
        n = arm["metrics"]["error"]["n"]
        values = np.r_[np.full(n - 1, fill), value]  # sum n + 2, then -1
        arm["metrics"]["error"] = Summary.from_values(values).to_state()
        assert e.apply_summary(orjson.dumps(bad), topic="s", partition=0, offset=k) == []
    assert e.counters["summaries_invalid"] == 2
    run(e, recs[12:], start=12)
    assert e.counters["summaries"] == 28
    ref = engine_for(config)
    run(ref, recs[:10])
    run(ref, recs[12:], start=12)
    assert e.states["ranker"].rows() == ref.states["ranker"].rows()


_RENAMED = """
experiments:
  - id: cx
    control: control
    arms: {control: 0.5, treatment: 0.5}
    guardrails:
      - {name: g, metric: METRIC, test: mean, harmful: increase, min_samples: 50}
"""


@pytest.mark.parametrize("q_before", [False, True])
def test_a_guardrail_that_reads_another_metric_after_a_config_change_starts_again(q_before):
    # The operator points guardrail g at another metric and restarts: the snapshot's test for
    # g had seen 500 values a side, the new metric has fewer, and its next update raised
    # "summaries must be cumulative: counts went down" out of apply_summaries, at every record
    # of the experiment and every restart.
    rng = np.random.default_rng(4)

    def record(k, names):
        arms = {a: {n: rng.normal(10.0, 1.0, 100) for n in names} for a in ("control", "treatment")}
        return summary_record("cx", arms, t0=k, t1=k + 1, offset_first=k, offset_last=k)

    before = Engine(parse_experiments(_RENAMED.replace("METRIC", "m"), where="a.yaml"))
    for k in range(5):  # q summarised already (another guardrail's) or not
        before.apply_summary(
            record(k, ["m", "q"] if q_before else ["m"]), topic="s", partition=0, offset=k
        )
    assert before.states["cx"].runners["g/treatment"].status.n_control == 500
    (snap,) = before.snapshots()
    after = Engine(parse_experiments(_RENAMED.replace("METRIC", "q"), where="b.yaml"))
    after.stash("cx", snap.value)
    for k in range(5, 8):
        after.apply_summary(record(k, ["m", "q"]), topic="s", partition=0, offset=k)
    st = after.states["cx"]
    assert after.counters["summaries"] == 3 and not after.take_unreadable()
    assert st.arms["control"].metrics["m"].count == 800  # the data is kept
    status = st.runners["g/treatment"].status
    n = 800 if q_before else 300
    assert (status.n_control, status.n_treatment) == (n, n)  # the test caught up on q
    assert st.runners["g/treatment"].detector.to_state()["looks"] == 3  # not m's 5 + 3


@pytest.mark.parametrize("change", ["arm_added", "split_changed", "arm_count_lower"])
def test_the_srm_check_restored_for_other_arms_or_counts_starts_again(config, change):
    # Adding an arm (or changing the split) and restarting: the SRM test restored with the
    # old allocation raised "unknown arms" out of apply_summaries at every record of the
    # experiment and every restart; restored with more units than the data holds, "counts
    # must be cumulative".
    _, recs, snap = _killed_with_history(config)
    yaml = CONFIG
    if change == "arm_added":
        yaml = CONFIG.replace("t1: 0.33, t2: 0.33}", "t1: 0.33, t2: 0.23, t3: 0.1}")
    elif change == "split_changed":
        yaml = CONFIG.replace(
            "{control: 0.34, t1: 0.33, t2: 0.33}", "{control: 0.5, t1: 0.25, t2: 0.25}"
        )
    else:
        snap["internal"]["arms"]["t1"]["count"] -= 1000
    assert yaml != CONFIG or change == "arm_count_lower"
    e = engine_for(parse_experiments(yaml, where="b.yaml"))
    e.stash("ranker", orjson.dumps(snap))
    run(e, recs[25:], start=25)
    st = e.states["ranker"]
    assert e.counters["summaries"] == 5 and not e.take_unreadable()
    assert st.srm.detector.to_state()["looks"] == 5  # a new test, caught up on the data
    assert st.arm_states["t1"] == "killed"  # the rest of the state is kept


# -- seeded fuzz: values perturbed within their type (records and snapshots) --------------------
def _perturbed(pick, v):
    """``v`` changed the way a buggy producer or a hand edit would: off by one, negated,
    scaled to the ends of the doubles, a list cut or repeated, a key dropped, a string
    changed or named as another (the mutations of the fuzz above replace types instead)."""
    big = 1.7976931348623157e308
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return pick.choice([v + 1, v - 1, -v, 0, v * 2**20, 2**53, 2**62, -(2**62), float(v)])
    if isinstance(v, float):
        return pick.choice(
            [-v, v * 1e300, v / 1e300, 0.0, 5e-324, big, -big, v + 1e-9, 253402300800.0, -1.0]
        )
    if isinstance(v, str):
        return pick.choice(["", v + "x", "control", "treatment", "metrics", "features"])
    if isinstance(v, list):
        if not v:
            return [0]
        return pick.choice([v[:-1], v + v[-1:], v[::-1], [], v[1:], [v[0]] * len(v)])
    if isinstance(v, dict):
        if not v:
            return {"x": 1}
        return {k: x for k, x in v.items() if k != pick.choice(sorted(v))}
    return 0


def _perturb(pick, doc, times):
    for _ in range(times):
        paths = list(_paths(doc))
        at = doc
        path = pick.choice(paths)
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = _perturbed(pick, at[path[-1]])
    return doc


def _restores(config, value):
    again = Engine(config, evaluation_interval_s=10.0, hmac_key=KEY)
    again.stash(orjson.loads(value)["experiment"], value)
    again.restore_pending(1)
    return not again.take_unreadable()


@pytest.mark.parametrize(("version", "seed"), [(1, 2), (1, 16), (2, 4)])
def test_perturbed_summary_records_never_stop_the_engine_nor_spoil_its_snapshots(version, seed):
    """Valid records with one to three fields perturbed within their type, between valid
    ones: never raises, every record is applied or counted, and every snapshot written
    restores. These seeds failed on the code of 55d3d7d (a snapshot it wrote did not
    restore); others of this fuzz found a merged overflow to inf and a name not a string."""
    import json
    import random

    config = parse_experiments(FUZZ_CONFIG, where="test.yaml")
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    valid = [_fuzz_record(rng, 10.0 * k + 5.0, version) for k in range(150)]
    engine = Engine(config, evaluation_interval_s=10.0)
    engine.apply_summaries([(orjson.dumps(r), "s", 0, i) for i, r in enumerate(valid[:20])])
    c = engine.counters
    for k in range(20, 150):
        bad = _perturb(pick, orjson.loads(orjson.dumps(valid[k])), pick.randint(1, 3))
        before = c["summaries"] + c["summaries_invalid"] + c["summaries_unknown_experiment"]
        batch = [json.dumps(bad).encode(), orjson.dumps(valid[k])]
        engine.apply_summaries([(v, "s", 0, 2 * k + i) for i, v in enumerate(batch)])
        assert c["summaries"] + c["summaries_invalid"] + c["summaries_unknown_experiment"] == (
            before + 2
        )
        for out in engine.snapshots():
            assert _restores(config, out.value)
    assert c["summaries"] >= 130


def test_perturbed_snapshots_never_stop_the_engine():
    """A valid snapshot with one to three fields perturbed within their type: restored or
    salvaged, records and commands go on without raising, and what is written restores (the
    seeds found a metric's data missing or an arm count lowered under its tests' counts, a
    negative unit count, a proportion's sum outside [0, count])."""
    import json
    import random

    config = parse_experiments(CONFIG, where="test.yaml")
    _, recs, snap = _killed_with_history(config)
    seeds = [*range(300), 1435, 2575]
    for seed in seeds:
        pick = random.Random(seed)
        raw = json.dumps(_perturb(pick, orjson.loads(orjson.dumps(snap)), pick.randint(1, 3)))
        e = engine_for(config)
        e.stash("ranker", raw.encode())
        if seed % 3 == 0:
            e.restore_pending(1)
        run(e, recs[25:], start=25)
        apply(e, signed("kill", arm="t1", id="z1"), offset=5, ts=1_764_400_001.0)
        apply(e, signed("resume", id="z2"), offset=6, ts=1_764_400_002.0)
        for out in e.snapshots():
            assert _restores(config, out.value), seed


def test_a_command_without_a_kafka_timestamp_leaves_a_snapshot_that_restores(config):
    # A record with no timestamp (-1 ms in Kafka) gives a command the event time -0.001 s, an
    # RFC 3339 time like any other (1969-12-31T23:59:59.999Z); the snapshot holding it must
    # restore, not be dead-lettered as unreadable.
    e = engine_for(config)
    kill = signed("kill", arm="t1", id="n1", issued_at=-0.001)
    e.command_max_age_s = 1e12
    (event,) = of_kind(apply(e, kill, ts=-0.001), "killswitch")
    assert event["time"] == "1969-12-31T23:59:59.999Z"
    (snap,) = e.snapshots()
    again = engine_for(config)
    again.stash("ranker", snap.value)
    again.restore_pending(1)
    assert again.take_unreadable() == [] and again.states["ranker"].last_ts == -0.001


def test_perturbed_snapshots_with_drift_change_and_anomaly_detectors_never_stop_the_engine():
    """As above for an experiment whose guardrails hold WindowDrift, TwoSampleDrift,
    RankCUSUM and SeasonalZScore states: the perturbed snapshot is restored or salvaged and
    the records after it apply without raising (seeds 47, 155 and 199 cut a detector's
    per-season or per-component list, which raised IndexError at the next update)."""
    import json
    import random

    config = parse_experiments(FUZZ_CONFIG, where="test.yaml")
    rng = np.random.default_rng(5)
    recs = [orjson.dumps(_fuzz_record(rng, 10.0 * k + 5.0, 2)) for k in range(50)]
    first = Engine(config, evaluation_interval_s=10.0)
    first.apply_summaries([(r, "s", 0, i) for i, r in enumerate(recs[:40])])
    snap = first.snapshots()[-1].value
    for seed in [*range(120), 155, 199]:
        pick = random.Random(seed)
        raw = json.dumps(_perturb(pick, orjson.loads(snap), pick.randint(1, 3))).encode()
        e = Engine(config, evaluation_interval_s=10.0)
        e.stash("fz", raw)
        results = e.apply_summaries([(r, "s", 0, 40 + i) for i, r in enumerate(recs[40:])])
        assert len(results) == 10 and e.counters["summaries"] == 10, seed
        e.snapshots()


def test_a_record_whose_key_is_not_its_experiment_is_invalid(config):
    # The evaluate stage passes the records' Kafka keys: a configured experiment's record under
    # another key (a foreign producer) would make the experiment live on two owners.
    recs = stream(4, n_batches=4)
    keyed = engine_for(config)
    keyed.apply_summaries(
        [(v, "armguard.summaries", 0, i) for i, v in enumerate(recs)],
        keys=[b"ranker", b"other", b"", b"ranker"],
    )
    assert keyed.counters["summaries"] == 2 and keyed.counters["summaries_invalid"] == 2
    assert keyed.states["ranker"].summary_offsets == {"armguard.summaries:0": [0, 3]}
    # Unknown experiments stay unknown whatever their key; without keys nothing is checked.
    other = summary_record(
        "other", {"control": {"error": [0.0]}}, t0=0, t1=1, offset_first=0, offset_last=0
    )
    keyed.apply_summaries([(other, "armguard.summaries", 0, 9)], keys=[b"ranker"])
    assert keyed.counters["summaries_unknown_experiment"] == 1
    unkeyed = engine_for(config)
    unkeyed.apply_summaries([(v, "armguard.summaries", 0, i) for i, v in enumerate(recs)])
    assert unkeyed.counters["summaries"] == 4
