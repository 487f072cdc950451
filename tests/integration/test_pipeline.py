"""The whole pipeline on the real broker: simulated telemetry -> ingest -> evaluate -> kill switch,
and `armguard replay` reaching the live decisions (bit for bit over the summaries topic)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.integration.test_evaluate import Setup
from tests.support.daemon import caught_up, committed_total, read_topic, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def cli(setup: Setup, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "ARMGUARD_KAFKA__BOOTSTRAP_SERVERS": setup.bootstrap, **setup.env}
    return subprocess.run(
        [sys.executable, "-m", "armguard.daemon.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )


async def test_live_pipeline_kills_the_regressed_arm_and_replay_agrees(
    kafka_bootstrap, tmp_path, unique
):
    s = Setup(kafka_bootstrap, tmp_path, unique)
    s.env["ARMGUARD_INGEST__ENABLED"] = "true"
    s.env["ARMGUARD_INGEST__FLUSH_INTERVAL_S"] = "0.5"
    s.experiments.write_text((ROOT / "config" / "demo.yaml").read_text())
    await s.create_topics()
    telemetry = orjson.loads(s.env["ARMGUARD_TOPICS__TELEMETRY"])[0]
    n = 120_000
    sim = [
        "simulate",
        "--experiments",
        "config/demo.yaml",
        "--scenario",
        "config/simulate-demo.yaml",
        "--records",
        str(n),
        "--start-ts",
        str(int(time.time())),  # fresh, so the records are within ingest's lateness window
    ]
    produced = await asyncio.to_thread(
        cli, s, *sim, "--kafka", "--topic", telemetry, "--partitions", "3"
    )
    assert produced.returncode == 0, produced.stderr.decode()
    try:
        d = s.daemon().start()
        await asyncio.to_thread(d.wait_ready)

        async def all_consumed():
            return (
                await committed_total(
                    kafka_bootstrap, s.env["ARMGUARD_INGEST__GROUP_ID"], telemetry
                )
                >= n
            )

        await wait_for(all_consumed, "ingest to commit every telemetry record", limit_s=120)

        async def all_evaluated():
            return await caught_up(kafka_bootstrap, s.group, s.topics.summaries)

        await wait_for(all_evaluated, "evaluate to commit every summary", limit_s=120)
        assert d.stop() == 0
        log = d.log.read_text()
        assert f"ingest: {n} consumed" in log
    finally:
        s.close()

    live = [r.value for r in await read_topic(kafka_bootstrap, s.topics.killswitch)]
    assert len(live) == 1
    ev = orjson.loads(live[0])
    assert ev["data"]["arms"] == {
        "control": "running",
        "treatment-a": "killed",
        "treatment-b": "running",
    }

    # Replaying the summaries topic reproduces the live kill-switch records byte for byte.
    rep = await asyncio.to_thread(cli, s, "replay", "--config", str(s.experiments), "--summaries")
    assert rep.returncode == 0, rep.stderr.decode()
    assert rep.stdout.splitlines() == live

    # Replaying the telemetry itself (cut by event time) reaches the same decision.
    path = tmp_path / "telemetry.jsonl"
    done = await asyncio.to_thread(cli, s, *sim, "--output", str(path))
    assert done.returncode == 0
    rep = await asyncio.to_thread(
        cli, s, "replay", "--config", str(s.experiments), "--cut-seconds", "1", str(path)
    )
    (line,) = rep.stdout.splitlines()
    again = orjson.loads(line)["data"]
    assert again["arms"] == ev["data"]["arms"]
    assert again["decision"]["guardrail"] == ev["data"]["decision"]["guardrail"]
