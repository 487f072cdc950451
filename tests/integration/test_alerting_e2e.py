"""End to end: an injected regression pages through the real Prometheus and Alertmanager.

The local Kafka broker, `armguard run` as a subprocess, `armguard simulate` producing telemetry
in which one arm's error rate jumps from 1% to 10%, a real Prometheus scraping the daemon with
the project's scrape config and alert rules, and a real Alertmanager with the project's config
whose receivers post to a webhook of this test. Only the timings (intervals, ``for:``, group
waits) and addresses differ from deploy/. The page must arrive carrying the experiment, the arm
and the guardrail; nothing about the healthy arm may page.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
from aiokafka.admin import NewTopic

from tests.support.alerting import Webhook, alertmanager, get_json, prometheus
from tests.support.daemon import DaemonProcess, topic_env, wait_for

pytestmark = pytest.mark.integration

EXPERIMENTS = """
experiments:
  - id: e2e-ranker
    control: control
    arms: {control: 0.34, treatment: 0.33, healthy: 0.33}
    alpha: 0.05
    metrics:
      error: {min: 0, max: 1}
    guardrails:
      - {metric: error, test: proportion, harmful: increase, margin: 0, min_samples: 200,
         action: kill}
"""

SCENARIO = """
seed: 11
rate: 1000
units: 6000
experiments:
  - id: e2e-ranker
    metrics:
      error: {dist: bernoulli, p: 0.01}
inject:
  - {kind: regression, experiment: e2e-ranker, arm: treatment, metric: error, at_s: 0, p: 0.1}
"""


async def test_injected_regression_pages_with_experiment_arm_and_guardrail(
    kafka_bootstrap, admin, unique, tmp_path
):
    env = topic_env(unique)
    # The telemetry topic exists before the daemon subscribes (as in production).
    await admin.create_topics([NewTopic(f"telemetry-{unique}", 2, 1)])
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(EXPERIMENTS)
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(SCENARIO)
    daemon_env = {
        **env,
        "ARMGUARD_INGEST__FLUSH_INTERVAL_S": "1",
        "ARMGUARD_EVALUATE__EVALUATION_INTERVAL_S": "1",
    }
    daemon = DaemonProcess(kafka_bootstrap, experiments, daemon_env, tmp_path / "daemon.log")

    async with Webhook() as hook:
        am, am_port = alertmanager(tmp_path, hook.base)
        daemon.start()
        prom = None
        try:
            await am.wait_ready()
            await asyncio.to_thread(daemon.wait_ready)
            # Prometheus starts once the daemon listens, or the shortened `for:` of ArmguardDown
            # would page about the startup.
            prom, prom_port = prometheus(
                tmp_path,
                armguard=f"127.0.0.1:{daemon.port}",
                alertmanager=f"127.0.0.1:{am_port}",
            )
            await prom.wait_ready()

            # Prometheus sees the daemon up and ready before anything goes wrong: no page yet.
            async def scraped() -> bool:
                url = f"http://127.0.0.1:{prom_port}/api/v1/query?query=armguard_ready"
                result = (await asyncio.to_thread(get_json, url))["data"]["result"]
                return bool(result) and result[0]["value"][1] == "1"

            await wait_for(scraped, "Prometheus scraping a ready daemon", limit_s=30)
            assert hook.alerts("/page") == []

            sim = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "armguard.daemon.cli",
                "simulate",
                "--experiments",
                str(experiments),
                "--scenario",
                str(scenario),
                "--kafka",
                "--records",
                "30000",
                env=daemon.env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(sim.communicate(), 60)
            assert sim.returncode == 0, out.decode()

            async def paged() -> list[dict]:
                return [
                    a
                    for a in hook.alerts("/page")
                    if a["labels"]["alertname"] == "ArmguardGuardrailBreach"
                ]

            pages = await wait_for(paged, "the guardrail breach page at the webhook", limit_s=90)
        finally:
            if prom is not None:
                prom.stop()
            am.stop()
            code = await asyncio.to_thread(daemon.stop)
        assert code == 0, daemon.log.read_text()[-3000:]

    page = pages[0]
    assert page["status"] == "firing"
    labels = page["labels"]
    assert labels["experiment"] == "e2e-ranker"
    assert labels["arm"] == "treatment"
    assert labels["guardrail"] == "error-proportion"
    assert labels["severity"] == "page"
    assert page["annotations"]["runbook_url"] == "deploy/RUNBOOK.md#armguardguardrailbreach"
    assert "e2e-ranker" in page["annotations"]["summary"]
    # Only the regressed arm pages: the healthy arm and the daemon itself stay quiet.
    assert {(a["labels"]["alertname"], a["labels"].get("arm")) for a in hook.alerts("/page")} == {
        ("ArmguardGuardrailBreach", "treatment")
    }
