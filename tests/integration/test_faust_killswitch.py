"""armguard[faust]: the kill switch in a faust GlobalTable, against the real local broker."""

from __future__ import annotations

import asyncio
import time

import faust  # the faust extra; the dev extra installs it, so this never skips
import pytest

from armguard.daemon.faust_killswitch import killswitch_table

from .killswitch_events import killswitch_event, publish

pytestmark = pytest.mark.integration

RUNNING = {"control": "running", "treatment": "running"}
KILLED = {"control": "running", "treatment": "killed"}


def _app(app_id: str, bootstrap: str, guarantee: str = "exactly_once"):
    return faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        processing_guarantee=guarantee,
        topic_replication_factor=1,
        topic_partitions=2,
    )


def test_an_app_without_exactly_once_is_refused(kafka_bootstrap):
    app = _app("armguard-refused", kafka_bootstrap, guarantee="at_least_once")
    with pytest.raises(ValueError, match="exactly_once"):
        killswitch_table(app)
    with pytest.raises(ValueError, match="fail_open"):
        killswitch_table(_app("armguard-refused-2", kafka_bootstrap), fail_open="no")


async def test_faust_table_follows_kills_skips_poison_and_aborts(
    kafka_bootstrap, make_topic, admin, unique
):
    topic = await make_topic("killswitch", partitions=2, compact=True)
    await publish(
        kafka_bootstrap,
        topic,
        [
            ("e1", killswitch_event("e1", 1, RUNNING)),
            ("e2", killswitch_event("e2", 1, RUNNING)),
            ("e1", b"not an event"),
        ],
    )
    await publish(kafka_bootstrap, topic, [("e2", killswitch_event("e2", 2, KILLED))], abort=True)
    app_id = f"armguard-faust-{unique}"
    app = _app(app_id, kafka_bootstrap)
    ks = killswitch_table(app, topic=topic, table_name="killswitch", fail_open=False)
    # What faust's Worker sets before starting the app: with exactly_once it makes the worker's
    # consumer read_committed (see the module docstring).
    app.in_worker = True
    await app.start()
    try:
        deadline = time.monotonic() + 30
        while ks.get("e1") is None or ks.get("e2") is None:
            assert time.monotonic() < deadline, "the faust table did not fill"
            await asyncio.sleep(0.05)
        assert ks.allowed("e1", "treatment") is True
        assert ks.allowed("e2", "treatment") is True  # the aborted kill was never read
        assert ks.allowed("unknown", "control") is False
        assert ks.skipped["not_json"] == 1

        await publish(kafka_bootstrap, topic, [("e2", killswitch_event("e2", 3, KILLED))])
        while ks.allowed("e2", "treatment"):
            assert time.monotonic() < deadline + 15, "the kill did not reach the faust table"
            await asyncio.sleep(0.05)
        assert ks.get("e2")["revision"] == 3 and ks.allowed("e2", "control") is True
    finally:
        await app.stop()
        topics = await admin.list_topics()
        await admin.delete_topics([t for t in topics if t.startswith(app_id)])
