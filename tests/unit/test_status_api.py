"""The status API, rollout gates and OFREP handlers, driven with plain requests; the bearer token
through the real HTTP server on a free port."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import orjson
import pytest
from prometheus_client import CollectorRegistry

from armguard.daemon.follower import KillSwitchFollower, parse_killswitch, parse_state
from armguard.daemon.health import Health
from armguard.daemon.http import HttpServer, Request
from armguard.daemon.settings import HttpSettings, KafkaSettings
from armguard.daemon.status_api import StatusApi

from .test_follower import event


def req(path, method="GET", body=b"", headers=None, query=None):
    return Request(
        method, path, query or {}, {k.lower(): v for k, v in (headers or {}).items()}, body
    )


def body_of(resp):
    return orjson.loads(resp.body) if resp.body else None


def snapshot(exp, revision, rows):
    return orjson.dumps(
        {
            "v": 1,
            "experiment": exp,
            "revision": revision,
            "config_version": "c1",
            "desired": {},
            "status": {
                "updated_ts": 5.0,
                "guardrails": rows,
                "srm": {"p_value": 0.4, "state": "ok"},
            },
            "internal": {"x": 1},
        }
    )


def row(arm, state, name="error-rate"):
    return {"guardrail": name, "arm": arm, "metric": "error", "test": "proportion", "state": state}


@pytest.fixture
def follower():
    f = KillSwitchFollower(KafkaSettings(), fail_open=False)
    t = f.table
    t.apply(
        parse_killswitch(
            b"live", event("live", 2, arms={"control": "running", "treatment": "running"})
        )
    )
    t.apply_status(parse_state(b"live", snapshot("live", 2, [row("treatment", "ok")])))
    t.apply(
        parse_killswitch(
            b"dead", event("dead", 4, arms={"control": "running", "treatment": "killed"})
        )
    )
    t.apply(parse_killswitch(b"thin", event("thin", 1)))
    t.apply_status(parse_state(b"thin", snapshot("thin", 1, [row("treatment", "inconclusive")])))
    t.apply(parse_killswitch(b"paused", event("paused", 3, state="paused")))
    f._set_ready(True)
    return f


@pytest.fixture
def api(follower):
    return StatusApi(follower)


def test_list_experiments(api):
    resp = api.list_experiments(req("/v1/experiments"))
    data = body_of(resp)
    assert resp.status == 200 and data["count"] == 4
    by = {e["experiment"]: e for e in data["experiments"]}
    assert list(by) == ["dead", "live", "paused", "thin"]
    assert by["dead"]["arms"]["treatment"] == {"state": "killed", "allowed": False, "gate": "fail"}
    assert by["live"]["arms"]["treatment"]["gate"] == "pass"
    assert by["thin"]["arms"]["treatment"]["gate"] == "inconclusive"


def test_experiment_detail_explains_the_state(api):
    data = body_of(api.experiment(req("/v1/experiments/live")))
    assert data["revision"] == 2 and data["state"] == "running"
    assert data["guardrails"] == [row("treatment", "ok")]
    assert data["srm"] == {"p_value": 0.4, "state": "ok"}
    assert data["config_version"] is None or isinstance(data["config_version"], str)
    assert set(data) >= {"last_decision", "offsets", "event_id", "time", "arms", "cause"}


@pytest.mark.parametrize(
    "path", ["/v1/experiments/nope", "/v1/experiments/live/arms/nope", "/v1/experiments/live/x"]
)
def test_unknown_experiment_or_arm_is_404(api, path):
    assert api.experiment(req(path)).status == 404


@pytest.mark.parametrize(
    ("path", "gate", "code"),
    [
        ("/v1/gate/live/treatment", "pass", 200),
        ("/v1/gate/live/control", "pass", 200),
        ("/v1/gate/dead/treatment", "fail", 503),
        ("/v1/gate/dead/control", "inconclusive", 425),
        ("/v1/gate/paused/control", "fail", 503),
        ("/v1/gate/thin/treatment", "inconclusive", 425),
    ],
)
def test_gate_status_codes_and_json(api, path, gate, code):
    resp = api.gate(req(path))
    assert (resp.status, body_of(resp)["gate"]) == (code, gate)
    # The Argo web metric reads the same gate from an always-200 resource.
    exp, arm = path.removeprefix("/v1/gate/").split("/")
    arm_resp = api.experiment(req(f"/v1/experiments/{exp}/arms/{arm}"))
    assert arm_resp.status == 200 and body_of(arm_resp)["gate"] == gate


def test_gate_inconclusive_can_pass_and_unknowns_are_404(api):
    resp = api.gate(req("/v1/gate/thin/treatment", query={"inconclusive": ["pass"]}))
    assert resp.status == 200 and body_of(resp)["gate"] == "inconclusive"
    assert api.gate(req("/v1/gate/nope/treatment")).status == 404
    assert api.gate(req("/v1/gate/live/nope")).status == 404
    assert api.gate(req("/v1/gate/live")).status == 404


def test_not_ready_answers(follower, api):
    follower._set_ready(False)
    assert api.list_experiments(req("/v1/experiments")).status == 503
    assert api.experiment(req("/v1/experiments/live")).status == 503
    resp = api.gate(req("/v1/gate/live/treatment"))
    assert resp.status == 503 and body_of(resp)["gate"] == "unavailable"
    single = api.ofrep_single(
        req("/ofrep/v1/evaluate/flags/armguard/live/treatment", "POST", b"{}")
    )
    assert single.status == 200
    assert body_of(single) == {
        "key": "armguard/live/treatment",
        "value": False,  # fail_open=False
        "reason": "ERROR",
        "variant": "default",
        "metadata": {"ready": False},
    }
    assert api.ofrep_bulk(req("/ofrep/v1/evaluate/flags", "POST", b"{}")).status == 503


def test_ofrep_single_static_and_disabled(api):
    on = body_of(
        api.ofrep_single(req("/ofrep/v1/evaluate/flags/armguard/live/treatment", "POST", b"{}"))
    )
    assert (on["value"], on["reason"], on["variant"]) == (True, "STATIC", "on")
    assert on["metadata"]["revision"] == 2
    off = body_of(
        api.ofrep_single(
            req(
                "/ofrep/v1/evaluate/flags/armguard/dead/treatment",
                "POST",
                b'{"context": {"targetingKey": "user-1"}}',
            )
        )
    )
    assert (off["value"], off["reason"], off["variant"]) == (False, "DISABLED", "off")
    assert off["metadata"]["armState"] == "killed"


@pytest.mark.parametrize(
    "key",
    ["armguard/nope/treatment", "armguard/live/nope", "other/live/treatment", "armguard/live", "x"],
)
def test_ofrep_unknown_keys_are_flag_not_found(api, key):
    resp = api.ofrep_single(req(f"/ofrep/v1/evaluate/flags/{key}", "POST", b"{}"))
    assert resp.status == 404
    assert body_of(resp)["errorCode"] == "FLAG_NOT_FOUND" and body_of(resp)["key"] == key


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "PARSE_ERROR"),
        (b"[1, 2]", "PARSE_ERROR"),
        (b'"context"', "PARSE_ERROR"),
        (b"\xff\xfe", "PARSE_ERROR"),
        (b'{"context": "user-1"}', "INVALID_CONTEXT"),
        (b'{"context": [1]}', "INVALID_CONTEXT"),
    ],
)
def test_ofrep_bad_bodies_are_400(api, body, code):
    single = api.ofrep_single(req("/ofrep/v1/evaluate/flags/armguard/live/treatment", "POST", body))
    assert single.status == 400 and body_of(single)["errorCode"] == code
    assert body_of(single)["key"] == "armguard/live/treatment"
    bulk = api.ofrep_bulk(req("/ofrep/v1/evaluate/flags", "POST", body))
    assert bulk.status == 400 and body_of(bulk)["errorCode"] == code


def test_ofrep_bulk_etag_and_304(follower, api):
    first = api.ofrep_bulk(req("/ofrep/v1/evaluate/flags", "POST", b"{}"))
    flags = {f["key"]: f["value"] for f in body_of(first)["flags"]}
    assert flags["armguard/live/treatment"] is True and flags["armguard/dead/treatment"] is False
    assert len(flags) == 8
    etag = first.headers["ETag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = api.ofrep_bulk(
            req("/ofrep/v1/evaluate/flags", "POST", b"{}", {"If-None-Match": header})
        )
        assert again.status == 304 and again.body == b"" and again.headers["ETag"] == etag
    stale = api.ofrep_bulk(req("/ofrep/v1/evaluate/flags", "POST", b"", {"If-None-Match": '"old"'}))
    assert stale.status == 200
    # A kill changes the flags and so the ETag.
    follower.table.apply(
        parse_killswitch(
            b"live", event("live", 3, arms={"control": "running", "treatment": "killed"})
        )
    )
    after = api.ofrep_bulk(req("/ofrep/v1/evaluate/flags", "POST", b"{}", {"If-None-Match": etag}))
    assert after.status == 200 and after.headers["ETag"] != etag
    assert {f["key"]: f["value"] for f in body_of(after)["flags"]}[
        "armguard/live/treatment"
    ] is False


def _call(url, method="GET", data=None, token=None):
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_bearer_token_guards_every_route_over_real_http(follower):
    server = HttpServer(HttpSettings(port=0, bearer_token="s3cret"), CollectorRegistry(), Health())
    StatusApi(follower).register(server)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        for path, method, data in [
            ("/v1/experiments", "GET", None),
            ("/v1/experiments/live", "GET", None),
            ("/v1/gate/live/treatment", "GET", None),
            ("/ofrep/v1/evaluate/flags/armguard/live/treatment", "POST", b"{}"),
            ("/ofrep/v1/evaluate/flags", "POST", b"{}"),
        ]:
            for token in (None, "wrong", "s3cret2", "S3CRET"):
                status, _ = await asyncio.to_thread(_call, base + path, method, data, token)
                assert status == 401, (path, token)
            status, _ = await asyncio.to_thread(_call, base + path, method, data, "s3cret")
            assert status == 200, path
        status, _ = await asyncio.to_thread(
            _call, base + "/ofrep/v1/evaluate/flags/armguard/live/treatment", "GET", None, "s3cret"
        )
        assert status == 405
    finally:
        await server.stop()
