"""Every example of the README's "Reading the kill switch" section runs against the real broker
and the daemon's HTTP routes, so the prose cannot drift from the code.

The Python blocks run as written, with three substitutions: the broker address, a unique topic
for ``armguard.killswitch`` and the test server's URL for ``http://127.0.0.1:9464``. The shell
block's request is replayed; the YAML block must reference deploy/argo's template and arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shlex
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from armguard.daemon.health import Health
from armguard.daemon.http import HttpServer
from armguard.daemon.integrations import start_integrations
from armguard.daemon.settings import Settings

from .killswitch_events import killswitch_event, publish

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = Path(os.environ.get("ARMGUARD_README", ROOT / "README.md"))
ARGO = ROOT / "deploy" / "argo" / "analysistemplate.yaml"
HEADING = "## Reading the kill switch"


def section() -> str:
    text = README.read_text() if README.is_file() else ""
    assert HEADING in text, f"{README.name} has no '{HEADING}' section"
    body = text.split(HEADING, 1)[1]
    return re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(), flags=re.S)


@pytest.fixture
async def world(kafka_bootstrap, make_topic):
    topic = await make_topic("killswitch", compact=True)
    state = await make_topic("state", compact=True)
    killed = {"control": "running", "treatment": "killed"}
    await publish(kafka_bootstrap, topic, [("ranker-v2", killswitch_event("ranker-v2", 4, killed))])
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={"killswitch": topic, "state": state},
        http={"port": 0, "bearer_token": "change-me"},
    )
    server = HttpServer(settings.http, CollectorRegistry(), Health())
    handle = await start_integrations(settings, server)
    await server.start()
    await handle.wait_ready(20)
    try:
        yield {
            "127.0.0.1:19092": kafka_bootstrap,
            "armguard.killswitch": topic,
            "http://127.0.0.1:9464": f"http://127.0.0.1:{server.port}",
        }
    finally:
        await server.stop()
        await handle.stop()


def _run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    return out.getvalue()


async def test_python_examples_run(world):
    from openfeature import api
    from openfeature.provider._registry import provider_registry

    codes = blocks("python")
    assert len(codes) == 4
    outputs = []
    for code in codes:
        for old, new in world.items():
            code = code.replace(old, new)
        try:
            outputs.append(await asyncio.to_thread(_run, code))
        finally:
            provider = provider_registry.get_default_provider()
            if hasattr(provider, "session"):  # the OFREP example's provider
                provider.session.close()
                await asyncio.to_thread(api.shutdown)
    asyncio_out, sync_out, ofrep_out, faust_out = outputs
    assert asyncio_out == "serving control lag 0\n"
    assert sync_out == "treatment is off: serve control\n"
    assert ofrep_out == ""  # the flag is false: the arm is killed
    assert faust_out == ""


async def test_curl_example_answers(world):
    (sh,) = blocks("sh")
    args = shlex.split(sh.strip())
    assert args[0] == "curl"
    url = next(a for a in args if a.startswith("http://"))
    header = args[args.index("-H") + 1]
    for old, new in world.items():
        url = url.replace(old, new)
    name, _, value = header.partition(": ")
    request = urllib.request.Request(url, headers={name: value})
    with await asyncio.to_thread(urllib.request.urlopen, request, timeout=5) as resp:
        assert resp.status == 200
        assert b'"treatment":{"state":"killed","allowed":false,"gate":"fail"}' in resp.read()


def test_argo_example_references_the_template():
    (snippet,) = blocks("yaml")
    analysis = yaml.safe_load(snippet)["strategy"]["canary"]["analysis"]
    template = yaml.safe_load(ARGO.read_text())
    assert analysis["templates"][0]["templateName"] == template["metadata"]["name"]
    required = {
        a["name"] for a in template["spec"]["args"] if "value" not in a and "valueFrom" not in a
    }
    assert {a["name"] for a in analysis["args"]} == required
