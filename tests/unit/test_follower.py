"""The follower's pure part: decoding kill-switch events and state snapshots, highest revision wins."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from armguard.daemon.errors import RecordRejected
from armguard.daemon.follower import (
    KillSwitchFollower,
    KillSwitchTable,
    parse_killswitch,
    parse_state,
)
from armguard.daemon.settings import KafkaSettings


def event(experiment="ranker-v2", revision=1, state="running", arms=None, **over):
    ev = {
        "specversion": "1.0",
        "id": f"{experiment}-{revision}",
        "source": "armguard",
        "type": "armguard.killswitch.v1",
        "subject": experiment,
        "time": "2025-11-28T03:20:00.000Z",
        "datacontenttype": "application/json",
        "data": {
            "experiment": experiment,
            "revision": revision,
            "state": state,
            "arms": arms or {"control": "running", "treatment": "running"},
            "cause": "guardrail",
        },
    }
    ev.update(over)
    return orjson.dumps(ev)


def test_running_arm_is_allowed_and_killed_arm_is_not():
    v = parse_killswitch(b"ranker-v2", event(arms={"control": "running", "treatment": "killed"}))
    assert dict(v.allowed) == {"control": True, "treatment": False}
    assert v.revision == 1 and v.state == "running" and v.cause == "guardrail"


@pytest.mark.parametrize("state", ["paused", "killed"])
def test_experiment_state_overrides_running_arms(state):
    v = parse_killswitch(b"ranker-v2", event(state=state))
    assert dict(v.allowed) == {"control": False, "treatment": False}


def _with_data(**data):
    ev = orjson.loads(event())
    ev["data"].update(data)
    return orjson.dumps(ev)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"ranker-v2", None, "tombstone"),
        (b"ranker-v2", b"{nope", "not_json"),
        (b"ranker-v2", b"[1, 2]", "not_cloudevent"),
        (b"ranker-v2", event(specversion="0.3"), "not_cloudevent"),
        (b"ranker-v2", event(type="armguard.decision.v1"), "wrong_type"),
        (b"ranker-v2", event(data="killed"), "bad_data"),
        (b"ranker-v2", _with_data(revision=-1), "bad_data"),
        (b"ranker-v2", _with_data(revision=True), "bad_data"),
        (b"ranker-v2", _with_data(revision="3"), "bad_data"),
        (b"ranker-v2", _with_data(state="dead"), "bad_data"),
        (b"ranker-v2", _with_data(arms={}), "bad_data"),
        (b"ranker-v2", _with_data(arms={"treatment": "gone"}), "bad_data"),
        (b"ranker-v2", _with_data(arms=["control"]), "bad_data"),
        (b"ranker-v2", _with_data(experiment=""), "bad_data"),
        (b"other", event(), "key_mismatch"),
        (b"\xff\xfe", event(), "bad_key"),
    ],
)
def test_invalid_records_are_rejected_with_a_reason(key, value, reason):
    with pytest.raises(RecordRejected) as info:
        parse_killswitch(key, value)
    assert info.value.reason == reason


def test_highest_revision_wins_whatever_the_order():
    t = KillSwitchTable()
    kill = parse_killswitch(b"e", event("e", 5, arms={"control": "running", "treatment": "killed"}))
    old = parse_killswitch(b"e", event("e", 4))
    assert t.apply(kill) == "applied"
    assert t.apply(old) == "stale"
    assert t.apply(kill) == "duplicate"
    assert t.allowed("e", "treatment") is False
    assert t.get("e").revision == 5


@given(st.permutations(list(range(8))))
def test_any_delivery_order_ends_on_the_highest_revision(order):
    t = KillSwitchTable()
    for rev in order:
        arms = {"control": "running", "treatment": "killed" if rev % 2 else "running"}
        t.apply(parse_killswitch(b"e", event("e", rev, arms=arms)))
    assert t.get("e").revision == 7
    assert t.allowed("e", "treatment") is False


def test_unknown_experiment_and_arm_answer_the_default():
    t = KillSwitchTable()
    t.apply(parse_killswitch(b"e", event("e")))
    assert t.allowed("nope", "control", default=True) is True
    assert t.allowed("nope", "control", default=False) is False
    assert t.allowed("e", "no-such-arm", default=False) is False


def test_state_snapshot_drops_internal_and_keeps_newest():
    snap = {
        "v": 1,
        "experiment": "e",
        "revision": 2,
        "config_version": "abc",
        "desired": {"state": "running", "arms": {"control": "running"}},
        "status": {"updated_ts": 1.0, "guardrails": [], "srm": None, "last_decision": None},
        "internal": {"secret": 1},
    }
    s = parse_state(b"e", orjson.dumps(snap))
    assert s.config_version == "abc" and "internal" not in s.status
    t = KillSwitchTable()
    assert t.apply_status(s) == "applied"
    assert t.apply_status(parse_state(b"e", orjson.dumps({**snap, "revision": 1}))) == "stale"
    assert t.experiments() == ["e"]
    with pytest.raises(RecordRejected):
        parse_state(b"e", orjson.dumps({**snap, "v": 2}))


def test_follower_answers_the_default_until_ready():
    f = KillSwitchFollower(KafkaSettings(), fail_open=False)
    f.table.apply(parse_killswitch(b"e", event("e")))
    assert f.ready is False and f.allowed("e", "control") is False
    f._set_ready(True)
    assert f.allowed("e", "control") is True
    assert f.allowed("unknown", "control") is False


def test_follower_counts_skips_and_keeps_the_last_good_state():
    f = KillSwitchFollower(KafkaSettings())
    f._set_ready(True)
    seen = []
    f.on_change(lambda exp, old, new: seen.append((exp, old and old.revision, new.revision)))
    f._on_record(f.topic, b"e", event("e", 1))
    f._on_record(f.topic, b"e", b"garbage")
    f._on_record(f.topic, b"e", None)
    f._on_record(f.topic, b"e", event("e", 0))
    assert f.get("e").revision == 1 and f.allowed("e", "treatment") is True
    assert dict(f.skipped) == {"not_json": 1, "tombstone": 1, "stale_revision": 1}
    assert seen == [("e", None, 1)]


def test_a_failing_callback_never_stops_the_follower():
    f = KillSwitchFollower(KafkaSettings())
    f._set_ready(True)

    def boom(*_):
        raise RuntimeError("user bug")

    f.on_change(boom)
    f._on_record(f.topic, b"e", event("e", 1))
    assert f.callback_errors == 1 and f.get("e").revision == 1


def test_bad_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="fail_open"):
        KillSwitchFollower(KafkaSettings(), fail_open="yes")
