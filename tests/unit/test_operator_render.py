"""The operator CLI's pure helpers: what `armguard status`/`watch` print of state snapshots and
how `armguard kill/resume/override` read the audit topic's answer."""

from __future__ import annotations

import orjson

from armguard.daemon.engine import Engine
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.operator import _render, _verdict
from tests.support.summaries import RANKER_EXPERIMENTS, regression_stream


def _snapshot():
    engine = Engine(parse_experiments(RANKER_EXPERIMENTS, where="test.yaml"))
    for i, value in enumerate(regression_stream(3, n_batches=12, bad_arm="t1")):
        engine.apply_summary(value, topic="s", partition=0, offset=i)
    return orjson.loads(engine.snapshots()[-1].value)


def test_a_snapshot_renders_its_desired_state_and_guardrails():
    snap = _snapshot()
    lines = _render({"ranker": snap}, None)
    assert lines[0].startswith("ranker: running (revision ")
    assert len(lines) == 1 + len(snap["status"]["guardrails"]) + (snap["status"]["srm"] is not None)
    assert _render({"ranker": snap}, "other") == []


def test_a_snapshot_of_another_shape_is_named_not_a_crash():
    # A snapshot written by another version: the rest still render.
    good = _snapshot()
    odd = {**good, "status": {"guardrails": [{"estimate": "x"}]}}
    lines = _render({"a-odd": odd, "b-missing": {"experiment": "b"}, "ranker": good}, None)
    assert lines[0].startswith("a-odd: snapshot not readable by this version (")
    assert lines[1].startswith("b-missing: snapshot not readable by this version (KeyError")
    assert lines[2] == _render({"ranker": good}, None)[0]


def test_an_audit_record_of_another_shape_is_no_verdict():
    command = {"id": "c1"}
    for value in (b"[]", b'{"data": [1]}', b'{"data": "x"}', b"not json", None):
        assert _verdict(value, command, 0, 5) is None
    rejected = orjson.dumps(
        {
            "data": {
                "kind": "command_rejected",
                "offset": {"partition": 0, "offset": 5},
                "reason": "bad_signature",
                "detail": "d",
            }
        }
    )
    assert _verdict(rejected, command, 0, 5) == (1, "rejected: bad_signature: d")
