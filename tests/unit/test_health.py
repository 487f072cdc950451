"""Liveness and readiness with an injected clock."""

from __future__ import annotations

import pytest

from armguard.daemon.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_loops_is_live_but_not_ready():
    h = Health()
    assert h.live
    assert not h.ready


def test_stall_detected_per_loop_limit():
    clock = Clock()
    h = Health(stall_after_s=10, clock=clock)
    h.beat("ingest")
    h.beat("evaluate", stall_after_s=60)
    clock.now += 11
    assert h.stalled() == ["ingest"]
    assert not h.live
    h.beat("ingest")  # the evaluate loop keeps its own 60 s limit on later beats
    h.beat("evaluate")
    clock.now += 30
    assert h.stalled() == ["ingest"]
    clock.now += 31
    assert h.stalled() == ["evaluate", "ingest"]


def test_done_forgets_a_loop():
    clock = Clock()
    h = Health(stall_after_s=1, clock=clock)
    h.beat("x")
    clock.now += 5
    h.done("x")
    assert h.live


def test_ready_needs_every_component():
    h = Health()
    h.set_ready("ingest", True)
    h.set_ready("evaluate", False)
    assert not h.ready
    h.set_ready("evaluate", True)
    assert h.ready
    h.set_ready("ingest", False)  # a revocation
    assert not h.ready


def test_report_is_json_ready():
    import json

    clock = Clock()
    h = Health(stall_after_s=5, clock=clock)
    h.beat("ingest")
    h.set_ready("ingest", True)
    clock.now += 2
    r = h.report()
    json.dumps(r)
    assert r == {
        "live": True,
        "ready": True,
        "loops": {"ingest": {"seconds_since_beat": 2.0, "stall_after_s": 5.0, "ok": True}},
        "components": {"ingest": True},
    }


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_stall_limit_validated(bad):
    with pytest.raises(ValueError, match="stall_after_s"):
        Health(stall_after_s=bad)
    with pytest.raises(ValueError, match="stall_after_s"):
        Health().beat("x", stall_after_s=bad if bad <= 0 else -1)
