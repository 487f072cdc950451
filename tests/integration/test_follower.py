"""The kill-switch follower against the real broker: bootstrap, streaming, read_committed,
poison records, the threaded wrapper and state snapshots."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest

from armguard.daemon.follower import KillSwitchFollower, ThreadedKillSwitchFollower
from armguard.daemon.settings import KafkaSettings

from .killswitch_events import guardrail_row, killswitch_event, publish, state_snapshot

pytestmark = pytest.mark.integration

BENCH_LATENCY = Path(__file__).resolve().parents[2] / "bench" / "follower_latency.py"

RUNNING = {"control": "running", "treatment": "running"}
KILLED = {"control": "running", "treatment": "killed"}


async def _until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_bootstrap_of_10000_compacted_experiments_then_a_kill_streams(
    kafka_bootstrap, make_topic
):
    topic = await make_topic("killswitch", partitions=3, compact=True)
    n = 10_000
    await publish(
        kafka_bootstrap,
        topic,
        ((f"exp-{i}", killswitch_event(f"exp-{i}", 1, RUNNING)) for i in range(n)),
    )
    # Later revisions of a few experiments, and an older one that must not roll a kill back.
    await publish(
        kafka_bootstrap,
        topic,
        [
            ("exp-7", killswitch_event("exp-7", 2, KILLED)),
            ("exp-7", killswitch_event("exp-7", 1, RUNNING)),
            ("exp-8", killswitch_event("exp-8", 2, RUNNING, state="paused")),
        ],
    )
    follower = KillSwitchFollower(KafkaSettings(bootstrap_servers=kafka_bootstrap), topic=topic)
    async with follower:
        assert follower.ready
        assert len(follower.table) == n
        assert follower.lag == 0
        assert follower.allowed("exp-0", "treatment") is True
        assert follower.allowed("exp-7", "treatment") is False
        assert follower.allowed("exp-7", "control") is True
        assert follower.allowed("exp-8", "control") is False
        assert follower.skipped["stale_revision"] == 1

        changes = []
        follower.on_change(lambda exp, old, new: changes.append((exp, old.revision, new.revision)))
        await publish(kafka_bootstrap, topic, [("exp-42", killswitch_event("exp-42", 2, KILLED))])
        await _until(lambda: not follower.allowed("exp-42", "treatment"))
        assert changes == [("exp-42", 1, 2)]


async def test_poison_records_are_skipped_and_counted_and_aborted_kills_never_seen(
    kafka_bootstrap, make_topic
):
    topic = await make_topic("killswitch", compact=True)
    await publish(kafka_bootstrap, topic, [("e", killswitch_event("e", 1, RUNNING))])
    await publish(
        kafka_bootstrap,
        topic,
        [
            ("e", b"not json at all"),
            ("e", {"specversion": "1.0", "type": "something.else"}),
            ("other", killswitch_event("e", 9, KILLED)),  # key mismatch
            ("e", None),  # tombstone
        ],
    )
    await publish(kafka_bootstrap, topic, [("e", killswitch_event("e", 2, KILLED))], abort=True)
    async with KillSwitchFollower(
        KafkaSettings(bootstrap_servers=kafka_bootstrap), topic=topic
    ) as follower:
        assert follower.allowed("e", "treatment") is True
        assert follower.get("e").revision == 1
        assert dict(follower.skipped) == {
            "not_json": 1,
            "wrong_type": 1,
            "key_mismatch": 1,
            "tombstone": 1,
        }
        await publish(kafka_bootstrap, topic, [("e", killswitch_event("e", 3, KILLED))])
        await _until(lambda: not follower.allowed("e", "treatment"))


async def test_empty_topic_is_ready_at_once_and_unknown_experiments_answer_the_default(
    kafka_bootstrap, make_topic
):
    topic = await make_topic("killswitch", partitions=2, compact=True)
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    async with KillSwitchFollower(settings, topic=topic, fail_open=False) as closed:
        assert closed.ready and closed.allowed("nobody", "control") is False
    async with KillSwitchFollower(settings, topic=topic, fail_open=True) as open_:
        assert open_.allowed("nobody", "control") is True


async def test_follower_waits_for_a_missing_topic_and_reports_not_ready(kafka_bootstrap, unique):
    follower = KillSwitchFollower(
        KafkaSettings(bootstrap_servers=kafka_bootstrap), topic=f"missing-{unique}", fail_open=False
    )
    await follower.start()
    try:
        with pytest.raises(TimeoutError):
            await follower.wait_ready(1.5)
        assert follower.ready is False and follower.allowed("e", "control") is False
    finally:
        await follower.stop()


async def test_state_snapshots_are_followed_for_status(kafka_bootstrap, make_topic):
    ks = await make_topic("killswitch", compact=True)
    state = await make_topic("state", compact=True)
    await publish(kafka_bootstrap, ks, [("e", killswitch_event("e", 1, RUNNING))])
    rows = [guardrail_row("treatment", "inconclusive")]
    await publish(kafka_bootstrap, state, [("e", state_snapshot("e", 1, RUNNING, rows))])
    async with KillSwitchFollower(
        KafkaSettings(bootstrap_servers=kafka_bootstrap), topic=ks, state_topic=state
    ) as follower:
        status = follower.status("e")
        assert status is not None and status.status["guardrails"][0]["state"] == "inconclusive"
        await publish(
            kafka_bootstrap,
            state,
            [("e", state_snapshot("e", 2, RUNNING, [guardrail_row("treatment", "ok")]))],
        )
        await _until(lambda: follower.status("e").revision == 2)


async def test_threaded_follower_for_synchronous_apps(kafka_bootstrap, make_topic):
    topic = await make_topic("killswitch", compact=True)
    await publish(kafka_bootstrap, topic, [("e", killswitch_event("e", 1, RUNNING))])
    follower = ThreadedKillSwitchFollower(
        KafkaSettings(bootstrap_servers=kafka_bootstrap), topic=topic
    )
    await asyncio.to_thread(follower.start, 20.0)
    try:
        assert follower.ready and follower.allowed("e", "treatment") is True
        seen = []
        follower.on_change(lambda exp, old, new: seen.append(new.revision))
        await publish(kafka_bootstrap, topic, [("e", killswitch_event("e", 2, KILLED))])

        def wait_for_kill() -> bool:  # what a synchronous app does: plain calls, no loop
            deadline = time.monotonic() + 10
            while follower.allowed("e", "treatment") and time.monotonic() < deadline:
                time.sleep(0.01)
            return follower.allowed("e", "treatment")

        assert await asyncio.to_thread(wait_for_kill) is False
        assert seen == [2]
    finally:
        await asyncio.to_thread(follower.stop)
    assert follower.ready is False


async def test_latency_bench_smoke(kafka_bootstrap):
    """bench/follower_latency.py works: every kill is seen by allowed() and timed (how fast is
    the bench's figure, not a test's assertion)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("armguard_bench_latency", BENCH_LATENCY)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = await bench.measure(kafka_bootstrap, kills=20, poll_timeout_ms=200)
    assert len(results["commit call"]) == 20
    assert all(0 < t < math.inf for t in results["commit call"])


async def test_threaded_follower_context_stops_its_thread_when_not_ready(kafka_bootstrap, unique):
    follower = ThreadedKillSwitchFollower(
        KafkaSettings(bootstrap_servers=kafka_bootstrap),
        topic=f"missing-{unique}",
        ready_timeout_s=0.5,
    )

    def enter() -> None:
        with follower:
            pass  # pragma: no cover - never ready

    with pytest.raises(TimeoutError):
        await asyncio.to_thread(enter)
    assert follower._thread is None and follower.ready is False
