"""End to end: the evaluate stage's own kill flips the OFREP flag the real OpenFeature SDK reads,
the rollout gate and the status API of a running `armguard run` (no hand-written events here)."""

from __future__ import annotations

import asyncio
import urllib.request

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from openfeature import api as openfeature
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.flag_evaluation import Reason

from armguard.daemon.kafka import ensure_topics
from armguard.daemon.settings import Settings
from tests.support.daemon import DaemonProcess, produce, topic_env, wait_for
from tests.support.summaries import regression_stream

pytestmark = pytest.mark.integration

EXPERIMENTS = """
experiments:
  - id: ranker
    control: control
    arms: {control: 0.34, t1: 0.33, t2: 0.33}
    alpha: 0.05
    guardrails:
      - {metric: error, test: proportion, harmful: increase, min_samples: 500, action: kill}
    srm: {alpha: 0.001, action: alert, min_samples: 1000}
"""


def _get_json(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


async def test_evaluate_kill_flips_the_openfeature_flag(kafka_bootstrap, tmp_path, unique):
    env = {**topic_env(unique), "ARMGUARD_INGEST__ENABLED": "false"}
    topics = {
        k.split("__", 1)[1].lower(): v for k, v in env.items() if k.startswith("ARMGUARD_TOPICS__")
    }
    topics["telemetry"] = orjson.loads(topics["telemetry"])
    settings = Settings(topics=topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await ensure_topics(admin, settings, partitions=2, replication_factor=1)
    finally:
        await admin.close()
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(EXPERIMENTS)
    daemon = DaemonProcess(kafka_bootstrap, experiments, env, tmp_path / "daemon.log").start()
    provider = OFREPProvider(f"http://127.0.0.1:{daemon.port}")
    openfeature.set_provider(provider, domain="armguard-e2e")
    client = openfeature.get_client("armguard-e2e")
    try:
        await asyncio.to_thread(daemon.wait_ready)
        records = regression_stream(31, n_batches=40, bad_arm="t1", start_batch_bad=3)

        async def flag(arm: str, want: bool):
            d = await asyncio.to_thread(
                client.get_boolean_details, f"armguard/ranker/{arm}", not want
            )
            return d if d.value is want and d.error_code is None else None

        # Before armguard has published anything for "ranker" the key is unknown: the SDK
        # gets FLAG_NOT_FOUND and returns the caller's default.
        unknown = await asyncio.to_thread(client.get_boolean_details, "armguard/ranker/t1", True)
        assert unknown.value is True and unknown.error_code.value == "FLAG_NOT_FOUND"
        # Then the evaluate stage sees t1 regress and kills it.
        summaries = [(b"ranker", v) for v in records]
        await produce(kafka_bootstrap, settings.topics.summaries, summaries)
        off = await wait_for(lambda: flag("t1", False), "the kill to reach OFREP", limit_s=90)
        assert off.reason == Reason.DISABLED and off.variant == "off"
        on = await wait_for(lambda: flag("t2", True), "t2 to stay on", limit_s=10)
        assert on.reason == Reason.STATIC

        status, body = await asyncio.to_thread(_get_json, daemon.port, "/v1/gate/ranker/t1")
        assert (status, body["gate"]) == (503, "fail")
        status, body = await asyncio.to_thread(_get_json, daemon.port, "/v1/experiments/ranker")
        assert status == 200 and body["arms"]["t1"]["state"] == "killed"
        assert body["last_decision"]["arm"] == "t1" and body["cause"] == "guardrail"
        assert any(r["arm"] == "t1" and r["state"] == "breach" for r in body["guardrails"])
        assert daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.proc.kill()
            daemon.proc.wait()
        await asyncio.to_thread(openfeature.shutdown)
        provider.session.close()
