"""`armguard run` serves the kill switch: the Daemon wires the follower (a supervised stage) and the
status API / OFREP routes onto its HTTP server, and /readyz waits for the follower's bootstrap."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from armguard.daemon.app import Daemon
from armguard.daemon.settings import Settings

from .killswitch_events import killswitch_event, publish

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict | None]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


async def test_daemon_serves_the_kill_switch(kafka_bootstrap, unique):
    port = _free_port()
    topics = {
        name: f"{name}-{unique}"
        for name in ("summaries", "deadletter", "killswitch", "decisions", "state", "commands")
    }
    settings = Settings(
        experiments_file=ROOT / "config" / "experiments.yaml",
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={**topics, "partitions": 2},
        ingest={"enabled": False},
        evaluate={"enabled": False},
        http={"port": port},
        integrations={"poll_timeout_ms": 50},
    )
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while (await asyncio.to_thread(_call, f"{base}/readyz"))[0] != 200:
            assert not task.done(), task
            assert time.monotonic() < deadline, "the daemon did not become ready"
            await asyncio.sleep(0.1)
        await publish(
            kafka_bootstrap,
            topics["killswitch"],
            [("e1", killswitch_event("e1", 1, {"control": "running", "treatment": "killed"}))],
        )
        url = f"{base}/ofrep/v1/evaluate/flags/armguard/e1/treatment"
        while (await asyncio.to_thread(_call, url, "POST", b"{}"))[0] != 200:
            assert time.monotonic() < deadline, "the kill did not reach OFREP"
            await asyncio.sleep(0.05)
        status, body = await asyncio.to_thread(_call, url, "POST", b"{}")
        assert body["value"] is False and body["reason"] == "DISABLED"
        status, body = await asyncio.to_thread(_call, f"{base}/v1/experiments")
        assert status == 200 and body["experiments"][0]["experiment"] == "e1"
    finally:
        daemon.stop.set()
        await asyncio.wait_for(task, 30)
