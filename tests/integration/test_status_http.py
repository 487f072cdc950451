"""A kill on the kill-switch topic reaches the status API, the rollout gates and the real
OpenFeature SDK (OFREP provider from PyPI) through the daemon's HTTP server."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import orjson
import pytest
from openfeature import api as openfeature
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.flag_evaluation import Reason
from prometheus_client import CollectorRegistry

from armguard.daemon.health import Health
from armguard.daemon.http import HttpServer
from armguard.daemon.integrations import start_integrations
from armguard.daemon.metrics import Metrics
from armguard.daemon.settings import Settings

from .killswitch_events import guardrail_row, killswitch_event, publish, state_snapshot

pytestmark = pytest.mark.integration

RUNNING = {"control": "running", "treatment": "running"}
KILLED = {"control": "running", "treatment": "killed"}


def _get(url: str, token: str | None = None) -> tuple[int, dict | None]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        is_json = exc.headers.get("Content-Type", "").startswith("application/json")
        return exc.code, orjson.loads(body) if is_json else None


@pytest.fixture
async def daemon_http(kafka_bootstrap, make_topic):
    """The daemon's HTTP server with the integrations, on fresh kill-switch and state topics."""
    ks = await make_topic("killswitch", partitions=2, compact=True)
    state = await make_topic("state", partitions=2, compact=True)
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={"killswitch": ks, "state": state},
        http={"port": 0, "bearer_token": "tok"},
        integrations={"fail_open": False, "poll_timeout_ms": 50},
    )
    registry = CollectorRegistry()
    health = Health()
    server = HttpServer(settings.http, registry, health)
    handle = await start_integrations(settings, server, Metrics(registry), health)
    await server.start()
    try:
        yield settings, server, handle, registry, health
    finally:
        await server.stop()
        await handle.stop()


async def _until(fn, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await fn()
        if value:
            return value
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


async def test_kill_flips_status_gate_and_the_openfeature_sdk(daemon_http, kafka_bootstrap):
    settings, server, handle, registry, health = daemon_http
    ks, state = settings.topics.killswitch, settings.topics.state
    await publish(kafka_bootstrap, ks, [("ranker-v2", killswitch_event("ranker-v2", 1, RUNNING))])
    await publish(
        kafka_bootstrap,
        state,
        [
            (
                "ranker-v2",
                state_snapshot("ranker-v2", 1, RUNNING, [guardrail_row("treatment", "ok")]),
            )
        ],
    )
    await handle.wait_ready(20)
    assert health.report()["ready"]
    base = f"http://127.0.0.1:{server.port}"
    await _until(
        lambda: asyncio.to_thread(lambda: _get(f"{base}/v1/experiments/ranker-v2", "tok")[0] == 200)
    )

    provider = OFREPProvider(base, headers_factory=lambda: {"Authorization": "Bearer tok"})
    openfeature.set_provider(provider, domain="armguard-it")
    client = openfeature.get_client("armguard-it")
    try:
        details = await asyncio.to_thread(
            client.get_boolean_details, "armguard/ranker-v2/treatment", False
        )
        assert details.value is True and details.reason == Reason.STATIC
        assert details.variant == "on"
        missing = await asyncio.to_thread(
            client.get_boolean_details, "armguard/ranker-v2/nope", False
        )
        assert missing.value is False and missing.error_code is not None
        assert missing.error_code.value == "FLAG_NOT_FOUND"

        status, body = await asyncio.to_thread(_get, f"{base}/v1/gate/ranker-v2/treatment", "tok")
        assert (status, body["gate"]) == (200, "pass")

        decision = {"guardrail": "error-proportion", "arm": "treatment", "action": "kill"}
        await publish(
            kafka_bootstrap,
            ks,
            [("ranker-v2", killswitch_event("ranker-v2", 2, KILLED, decision=decision))],
        )

        async def flipped():
            d = await asyncio.to_thread(
                client.get_boolean_details, "armguard/ranker-v2/treatment", True
            )
            return d if d.value is False else None

        details = await _until(flipped)
        assert details.reason == Reason.DISABLED and details.flag_metadata["revision"] == 2

        status, body = await asyncio.to_thread(_get, f"{base}/v1/gate/ranker-v2/treatment", "tok")
        assert (status, body["gate"]) == (503, "fail")
        status, body = await asyncio.to_thread(
            _get, f"{base}/v1/experiments/ranker-v2/arms/treatment", "tok"
        )
        assert (status, body["gate"], body["allowed"]) == (200, "fail", False)
        status, body = await asyncio.to_thread(_get, f"{base}/v1/experiments/ranker-v2", "tok")
        assert body["last_decision"] == decision and body["arms"]["treatment"]["state"] == "killed"
        assert (await asyncio.to_thread(_get, f"{base}/v1/experiments", "wrong"))[0] == 401
    finally:
        await asyncio.to_thread(openfeature.shutdown)
        provider.session.close()
    assert registry.get_sample_value("armguard_records_consumed_total", {"topic": ks}) == 2
