"""The broker goes away mid-run and comes back: the daemon reconnects and catches up.

This test starts its own broker (scripts/kafka-local on a free port, its own data folder) so
stopping it does not disturb the other tests' broker.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_evaluate import Setup
from tests.support.summaries import regression_stream

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def kafka_local(command: str, port: int, run_dir: Path) -> None:
    env = {**os.environ, "KAFKA_PORT": str(port), "ARMGUARD_RUN_DIR": str(run_dir)}
    done = subprocess.run(
        [str(ROOT / "scripts" / "kafka-local"), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"kafka-local {command} failed:\n{done.stdout}\n{done.stderr}"


def _free_pair() -> int:
    """A client port whose successor (the controller's) is free too, below the kernel's
    ephemeral range: a port handed out by bind(0) and released is free for any outgoing
    connection to take again before the broker binds it (a CI run failed so, 'Address
    already in use'), and the controller's port + 1 was never checked."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise AssertionError("no two free adjacent ports in 20000-32000")


@pytest.fixture
def own_broker(tmp_path):
    port = _free_pair()
    run_dir = tmp_path / "broker"
    kafka_local("start", port, run_dir)
    try:
        yield port, run_dir
    finally:
        kafka_local("stop", port, run_dir)


async def test_daemon_reconnects_and_catches_up_after_a_broker_restart(
    own_broker, tmp_path, unique
):
    port, run_dir = own_broker
    s = Setup(f"127.0.0.1:{port}", tmp_path / "run", unique)
    await s.create_topics()
    records = regression_stream(31, n_batches=40, bad_arm="t1", start_batch_bad=20)
    try:
        d = s.daemon().start()
        await asyncio.to_thread(d.wait_ready)
        await s.feed(records[:20])
        await s.processed(20)
        assert await s.killswitch() == []

        await asyncio.to_thread(kafka_local, "stop", port, run_dir)
        assert d.alive(), "the daemon must ride out a broker outage"
        await asyncio.to_thread(kafka_local, "start", port, run_dir)

        await s.feed(records[20:])
        await s.processed(40)
        events = await s.killswitch()
        assert len(events) == 1 and events[0]["data"]["arms"]["t1"] == "killed"
        assert d.alive()
        assert d.stop() == 0
    finally:
        s.close()


async def test_daemon_started_before_the_broker_waits_for_it(tmp_path, unique):
    port = _free_pair()
    run_dir = tmp_path / "broker"
    s = Setup(f"127.0.0.1:{port}", tmp_path / "run", unique)
    d = s.daemon().start()
    try:

        def probes() -> tuple[int, int]:
            return d.get("/healthz")[0], d.get("/readyz")[0]

        deadline = asyncio.get_running_loop().time() + 30
        while probes() != (200, 503):  # up and live, not ready: no broker yet
            assert d.alive(), d.log.read_text()[-3000:]
            assert asyncio.get_running_loop().time() < deadline, probes()
            await asyncio.sleep(0.2)  # polling interval of an observable condition
        assert "cannot reach Kafka" in d.log.read_text()
        await asyncio.to_thread(kafka_local, "start", port, run_dir)
        await asyncio.to_thread(d.wait_ready, 90)
        await s.feed(regression_stream(32, n_batches=30, bad_arm="t2", start_batch_bad=5))
        await s.processed(30)
        events = await s.killswitch()
        assert len(events) == 1 and events[0]["data"]["arms"]["t2"] == "killed"
        assert d.stop() == 0
    finally:
        s.close()
        kafka_local("stop", port, run_dir)
