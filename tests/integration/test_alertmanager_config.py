"""The project's Alertmanager config in a real Alertmanager: routing, grouping and inhibition.

Alerts are posted to Alertmanager's API as Prometheus would send them; the receivers' webhooks
point at a server of the test. Only timings and receiver URLs differ from deploy/alertmanager/.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from tests.support.alerting import Webhook, alertmanager, get_json, post_json
from tests.support.daemon import wait_for

pytestmark = pytest.mark.integration


def alert(name: str, severity: str, **labels: str) -> dict:
    return {
        "labels": {"alertname": name, "severity": severity, **labels},
        "annotations": {"summary": name},
        "startsAt": datetime.now(UTC).isoformat(),
    }


async def test_breach_pages_and_inhibits_the_same_experiments_tickets(tmp_path):
    async with Webhook() as hook:
        am, port = alertmanager(tmp_path, hook.base)
        try:
            await am.wait_ready()
            alerts = [
                alert(
                    "ArmguardGuardrailBreach",
                    "page",
                    experiment="ranker-v2",
                    arm="treatment",
                    guardrail="error-proportion",
                    test="proportion",
                ),
                alert("ArmguardSampleRatioMismatch", "ticket", experiment="ranker-v2"),
                alert("ArmguardSampleRatioMismatch", "ticket", experiment="checkout-bandit"),
                alert(
                    "ArmguardConsumerLagGrowing",
                    "ticket",
                    group="armguard-ingest",
                    topic="telemetry",
                ),
            ]
            assert (
                await asyncio.to_thread(post_json, f"http://127.0.0.1:{port}/api/v2/alerts", alerts)
                == 200
            )

            async def delivered() -> bool:
                return bool(hook.alerts("/page")) and len(hook.alerts("/ticket")) >= 2

            await wait_for(delivered, "the page and two tickets", limit_s=30)

            # Alertmanager itself says the paged experiment's ticket is inhibited by the page
            # (so it is never sent), rather than the test waiting to see nothing arrive.
            async def inhibited() -> bool:
                url = f"http://127.0.0.1:{port}/api/v2/alerts"
                for a in await asyncio.to_thread(get_json, url):
                    labels = a["labels"]
                    if (labels["alertname"], labels.get("experiment")) == (
                        "ArmguardSampleRatioMismatch",
                        "ranker-v2",
                    ):
                        return a["status"]["state"] == "suppressed" and bool(
                            a["status"]["inhibitedBy"]
                        )
                return False

            await wait_for(inhibited, "the ranker-v2 ticket inhibited by its page", limit_s=30)
        finally:
            am.stop()

    pages = hook.alerts("/page")
    assert [a["labels"]["alertname"] for a in pages] == ["ArmguardGuardrailBreach"]
    assert pages[0]["labels"]["experiment"] == "ranker-v2"
    assert hook.received["/page"][0]["groupLabels"] == {"experiment": "ranker-v2"}
    tickets = {
        (a["labels"]["alertname"], a["labels"].get("experiment")) for a in hook.alerts("/ticket")
    }
    # The paged experiment's SRM ticket is inhibited; other experiments' and the daemon's are not.
    assert tickets == {
        ("ArmguardSampleRatioMismatch", "checkout-bandit"),
        ("ArmguardConsumerLagGrowing", None),
    }
