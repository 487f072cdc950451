"""The Argo Rollouts and Flagger manifests under deploy/ are well formed and get from the status
API exactly the answers their semantics rely on.

No kubeconform/kubeval is installable offline (not on PyPI, Debian or npm here), and
kubernetes-validate only knows built-in kinds, not these CRDs. So the schema check is a documented
structural one: every key of the parts of `argoproj.io/v1alpha1 AnalysisTemplate` and
`flagger.app/v1beta1 Canary` that the manifests use is checked for name and type against the
fields of the published CRDs (unknown keys are errors, as a strict kubeconform run would report).
Then the URLs, JSON paths and conditions are exercised against the real HTTP server.
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry

from armguard.daemon.follower import KillSwitchFollower, parse_killswitch, parse_state
from armguard.daemon.health import Health
from armguard.daemon.http import HttpServer
from armguard.daemon.settings import HttpSettings, KafkaSettings
from armguard.daemon.status_api import StatusApi

from .test_follower import event
from .test_status_api import row, snapshot

ROOT = Path(__file__).resolve().parents[2]
ARGO = ROOT / "deploy" / "argo" / "analysistemplate.yaml"
FLAGGER = ROOT / "deploy" / "flagger" / "canary.yaml"
SERVICE = ROOT / "deploy" / "kubernetes" / "service.yaml"

STR, INT, BOOL = str, int, bool
DURATION = re.compile(r"^\d+(ms|s|m|h)$")

# The fields of the CRDs the manifests may use: {key: type or nested schema}; a list in
# brackets is "list of". Names follow the upstream CRDs (argo-rollouts v1.x, flagger v1.x).
META = {"name": STR, "namespace": STR, "labels": dict, "annotations": dict}
ARGO_SCHEMA = {
    "apiVersion": STR,
    "kind": STR,
    "metadata": META,
    "spec": {
        "args": [
            {
                "name": STR,
                "value": STR,
                "valueFrom": {
                    "secretKeyRef": {"name": STR, "key": STR},
                    "fieldRef": {"fieldPath": STR},
                },
            }
        ],
        "dryRun": [{"metricName": STR}],
        "metrics": [
            {
                "name": STR,
                "interval": DURATION,
                "initialDelay": DURATION,
                "count": INT,
                "failureLimit": INT,
                "inconclusiveLimit": INT,
                "consecutiveErrorLimit": INT,
                "successCondition": STR,
                "failureCondition": STR,
                "provider": {
                    "web": {
                        "url": STR,
                        "method": STR,
                        "headers": [{"key": STR, "value": STR}],
                        "body": STR,
                        "timeoutSeconds": INT,
                        "jsonPath": STR,
                        "insecure": BOOL,
                    }
                },
            }
        ],
    },
}
FLAGGER_SCHEMA = {
    "apiVersion": STR,
    "kind": STR,
    "metadata": META,
    "spec": {
        "targetRef": {"apiVersion": STR, "kind": STR, "name": STR},
        "progressDeadlineSeconds": INT,
        "service": {"port": INT, "targetPort": INT, "portName": STR},
        "analysis": {
            "interval": DURATION,
            "threshold": INT,
            "maxWeight": INT,
            "stepWeight": INT,
            "iterations": INT,
            "webhooks": [
                {
                    "name": STR,
                    "type": {
                        "confirm-rollout",
                        "pre-rollout",
                        "rollout",
                        "confirm-traffic-increase",
                        "confirm-promotion",
                        "post-rollout",
                        "rollback",
                        "event",
                    },
                    "url": STR,
                    "timeout": DURATION,
                    "metadata": dict,
                    "muteAlert": BOOL,
                    "retries": INT,
                }
            ],
        },
    },
}


def check(value: Any, schema: Any, path: str = "") -> list[str]:
    """Problems of ``value`` against ``schema`` (strict: unknown keys are problems)."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        problems = []
        for key, sub in value.items():
            if key not in schema:
                problems.append(f"{path}.{key}: unknown field")
            else:
                problems += check(sub, schema[key], f"{path}.{key}")
        return problems
    if isinstance(schema, list):
        if not isinstance(value, list) or not value:
            return [f"{path}: expected a non-empty list"]
        return [p for i, v in enumerate(value) for p in check(v, schema[0], f"{path}[{i}]")]
    if isinstance(schema, set):
        return [] if value in schema else [f"{path}: {value!r} not one of {sorted(schema)}"]
    if isinstance(schema, re.Pattern):
        ok = isinstance(value, str) and schema.match(value)
        return [] if ok else [f"{path}: {value!r} is not a duration"]
    if schema is INT and isinstance(value, bool):
        return [f"{path}: expected {schema.__name__}"]
    return [] if isinstance(value, schema) else [f"{path}: expected {schema.__name__}"]


def test_schema_checker_catches_typos():
    bad = {"apiVersion": "x", "kind": "y", "spec": {"metrics": [{"name": "m", "intervall": "1m"}]}}
    assert check(bad, ARGO_SCHEMA) == [".spec.metrics[0].intervall: unknown field"]
    assert check({"spec": {"analysis": {"interval": "soon"}}}, FLAGGER_SCHEMA) == [
        ".spec.analysis.interval: 'soon' is not a duration"
    ]


def test_argo_analysis_template_is_well_formed():
    doc = yaml.safe_load(ARGO.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("argoproj.io/v1alpha1", "AnalysisTemplate")
    assert check(doc, ARGO_SCHEMA) == []
    args = {a["name"] for a in doc["spec"]["args"]}
    for metric in doc["spec"]["metrics"]:
        used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", orjson.dumps(metric).decode()))
        assert used <= args, used - args


def test_flagger_canary_is_well_formed():
    doc = yaml.safe_load(FLAGGER.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("flagger.app/v1beta1", "Canary")
    assert check(doc, FLAGGER_SCHEMA) == []
    types = {w["type"] for w in doc["spec"]["analysis"]["webhooks"]}
    assert types == {"rollout", "confirm-traffic-increase"}


def test_manifests_point_at_the_armguard_service():
    svc = yaml.safe_load(SERVICE.read_text())
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    port = svc["spec"]["ports"][0]["port"]
    argo = yaml.safe_load(ARGO.read_text())
    default_url = next(a["value"] for a in argo["spec"]["args"] if a["name"] == "armguard-url")
    assert default_url == f"http://{host}:{port}"
    for hook in yaml.safe_load(FLAGGER.read_text())["spec"]["analysis"]["webhooks"]:
        assert hook["url"].startswith(f"http://{host}:{port}/v1/gate/")


# -- the behaviour the manifests rely on, over real HTTP -------------------------------------------


def json_path(expr: str, data: Any) -> Any:
    """The subset of Kubernetes JSONPath the template uses: ``{$.a.b}``."""
    m = re.fullmatch(r"\{\$((?:\.[\w-]+)+)\}", expr)
    assert m, expr
    for part in m.group(1).strip(".").split("."):
        data = data[part]
    return data


def argo_condition(cond: str, result: Any) -> bool:
    """The conditions the template uses: ``result == "<literal>"``."""
    m = re.fullmatch(r'result == "([^"]*)"', cond)
    assert m, cond
    return result == m.group(1)


@pytest.fixture
async def server():
    f = KillSwitchFollower(KafkaSettings(), fail_open=False)
    t = f.table
    t.apply(parse_killswitch(b"ranker-v2", event("ranker-v2", 1)))
    t.apply_status(parse_state(b"ranker-v2", snapshot("ranker-v2", 1, [row("treatment", "ok")])))
    t.apply(parse_killswitch(b"thin", event("thin", 1)))
    t.apply(
        parse_killswitch(
            b"killed", event("killed", 2, arms={"control": "running", "treatment": "killed"})
        )
    )
    f._set_ready(True)
    srv = HttpServer(HttpSettings(port=0, bearer_token="tok"), CollectorRegistry(), Health())
    StatusApi(f).register(srv, gate_public=True)
    await srv.start()
    try:
        yield srv, f
    finally:
        await srv.stop()


def _http(url: str, method: str = "GET", headers=None, data: bytes | None = None):
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def _argo_outcome(base: str, experiment: str, arm: str) -> str:
    doc = yaml.safe_load(ARGO.read_text())
    metric = doc["spec"]["metrics"][0]
    web = metric["provider"]["web"]
    values = {"armguard-url": base, "experiment": experiment, "arm": arm, "armguard-token": "tok"}

    def render(s: str) -> str:
        return re.sub(r"\{\{args\.([\w-]+)\}\}", lambda m: values[m.group(1)], s)

    headers = {h["key"]: render(h["value"]) for h in web["headers"]}
    status, body = _http(render(web["url"]), headers=headers)
    if not 200 <= status < 300:
        return "Error"
    result = json_path(web["jsonPath"], body)
    if argo_condition(metric["failureCondition"], result):
        return "Failed"
    if argo_condition(metric["successCondition"], result):
        return "Successful"
    return "Inconclusive"


@pytest.mark.parametrize(
    ("experiment", "outcome"),
    [
        ("ranker-v2", "Successful"),
        ("killed", "Failed"),
        ("thin", "Inconclusive"),
        ("nope", "Error"),
    ],
)
async def test_argo_measurement_outcomes(server, experiment, outcome):
    srv, _ = server
    base = f"http://127.0.0.1:{srv.port}"
    assert await asyncio.to_thread(_argo_outcome, base, experiment, "treatment") == outcome


async def test_argo_measurement_is_an_error_while_not_ready(server):
    srv, follower = server
    follower._set_ready(False)
    base = f"http://127.0.0.1:{srv.port}"
    assert await asyncio.to_thread(_argo_outcome, base, "ranker-v2", "treatment") == "Error"


FLAGGER_PAYLOAD = orjson.dumps(
    {"name": "ranker", "namespace": "ranker", "phase": "Progressing", "metadata": {}}
)


@pytest.mark.parametrize(
    ("experiment", "rollout", "confirm"),
    [("ranker-v2", 200, 200), ("killed", 503, 503), ("thin", 200, 425)],
)
async def test_flagger_webhook_answers(server, experiment, rollout, confirm):
    srv, _ = server
    hooks = {
        w["type"]: w["url"]
        for w in yaml.safe_load(FLAGGER.read_text())["spec"]["analysis"]["webhooks"]
    }
    got = {}
    for kind, url in hooks.items():
        local = re.sub(r"^http://[^/]+", f"http://127.0.0.1:{srv.port}", url)
        local = local.replace("/ranker-v2/", f"/{experiment}/")
        # Flagger POSTs a JSON payload and sends no token (the gate is public here).
        status, body = await asyncio.to_thread(
            _http, local, "POST", {"Content-Type": "application/json"}, FLAGGER_PAYLOAD
        )
        got[kind] = status
        assert body["gate"] in ("pass", "fail", "inconclusive")
    assert got == {"rollout": rollout, "confirm-traffic-increase": confirm}
