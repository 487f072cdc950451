"""The kill switch over HTTP: status API, rollout gates and OpenFeature (OFREP), fed by the follower.

Every instance follows the whole ``armguard.killswitch`` topic (and ``armguard.state``), so any
instance answers for every experiment, not only the ones whose partitions it evaluates. The routes
are registered on the daemon's :class:`~armguard.daemon.http.HttpServer`, so they share its port,
its limits and its optional bearer token (``http.bearer_token``: when set, every route here needs
``Authorization: Bearer <token>`` and a missing or wrong one is answered 401; when unset the
server binds loopback by default and everything here is read-only anyway).

Routes
------
``GET /v1/experiments``
    200 ``{"ready", "lag", "count", "experiments": [{experiment, revision, state, cause, arms:
    {arm: {state, allowed, gate}}}]}``, sorted by experiment; 503 while the follower is not ready.
``GET /v1/experiments/{id}``
    200 with the desired state of each arm, the last decision and its explanation (guardrail,
    estimate, bounds, p/e-value, n, offsets), every guardrail row (ok / warn / breach /
    inconclusive / overridden) and the SRM check; 404 for an unknown experiment.
``GET /v1/experiments/{id}/arms/{arm}``
    200 ``{"experiment", "arm", "gate", "allowed", "state", "reason", "guardrails"}``, always 200
    while known (the Argo Rollouts web metric reads ``$.gate``); 404 unknown.
``GET|POST /v1/gate/{id}/{arm}``
    The same gate as a status code, for Flagger webhooks: ``pass`` 200, ``fail`` 503 (the arm may
    not receive traffic: it or its experiment is killed or paused), ``inconclusive`` 425 Too Early
    (no guardrail has enough data yet); add ``?inconclusive=pass`` to answer 200 for it. 404 for
    an unknown experiment or arm, 503 with ``"gate": "unavailable"`` while not ready.
``POST /ofrep/v1/evaluate/flags/{key}`` and ``POST /ofrep/v1/evaluate/flags``
    OFREP single and bulk evaluation; see :class:`StatusApi`.

The gate of an arm is ``fail`` when the arm may not receive traffic; otherwise ``inconclusive``
when no guardrail row for it exists yet or any is ``inconclusive``, else ``pass`` (a ``breach``
whose action only alerts leaves the arm running and the gate passing: the kill switch decides).

Examples
--------
>>> from armguard.daemon.follower import KillSwitchTable
>>> flag_key("ranker-v2", "treatment")
'armguard/ranker-v2/treatment'
>>> parse_flag_key("armguard/ranker-v2/treatment")
('ranker-v2', 'treatment')
>>> parse_flag_key("other/flag") is None
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from .follower import ExperimentStatus, ExperimentView, KillSwitchFollower
from .http import HttpServer, Request, Response

__all__ = ["FLAG_PREFIX", "StatusApi", "arm_gate", "flag_key", "parse_flag_key"]

FLAG_PREFIX = "armguard/"

_GATE_STATUS = {"pass": 200, "fail": 503, "inconclusive": 425}


def flag_key(experiment: str, arm: str) -> str:
    """The OFREP flag key of an arm: true while the arm may receive traffic."""
    return f"{FLAG_PREFIX}{experiment}/{arm}"


def parse_flag_key(key: str) -> tuple[str, str] | None:
    """``(experiment, arm)`` of an armguard flag key, or None if it is not one."""
    if not key.startswith(FLAG_PREFIX):
        return None
    experiment, sep, arm = key[len(FLAG_PREFIX) :].rpartition("/")
    if not sep or not experiment or not arm:
        return None
    return experiment, arm


def _rows(view: ExperimentView | None, status: ExperimentStatus | None) -> list[dict[str, Any]]:
    """The freshest guardrail rows: the snapshot's unless the kill-switch event is newer."""
    rows: Any = None
    if status is not None and (view is None or status.revision >= view.revision):
        rows = status.status.get("guardrails")
    if rows is None and view is not None:
        rows = view.data.get("guardrails")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def arm_gate(
    view: ExperimentView, status: ExperimentStatus | None, arm: str
) -> tuple[str, str, list[dict[str, Any]]]:
    """``(gate, reason, rows)`` of one arm: gate is ``pass``, ``fail`` or ``inconclusive``."""
    rows = _rows(view, status)
    mine = [r for r in rows if r.get("arm") == arm]
    if not view.allowed.get(arm, False):
        return "fail", f"arm {view.arms.get(arm)}, experiment {view.state}", mine
    # The control arm has no rows of its own (guardrails compare treatments with it).
    considered = mine or ([] if arm != _control_of(view, rows) else rows)
    if not considered:
        return "inconclusive", "no guardrail result yet", mine
    thin = [r.get("guardrail") for r in considered if r.get("state") == "inconclusive"]
    if thin:
        return "inconclusive", f"not enough data yet: {', '.join(map(str, thin))}", mine
    return "pass", "running; every guardrail has a result", mine


def _control_of(view: ExperimentView, rows: list[dict[str, Any]]) -> str | None:
    # The control is the arm that no guardrail row names (every row is a treatment arm).
    named = {r.get("arm") for r in rows}
    candidates = [a for a in view.arms if a not in named]
    return candidates[0] if rows and len(candidates) == 1 else None


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    response = Response(status, orjson.dumps(data) + b"\n", "application/json")
    if headers:
        response.headers.update(headers)
    return response


def _not_ready() -> Response:
    return _json(
        {"ready": False, "error": "the kill-switch follower is still bootstrapping"},
        503,
        {"Retry-After": "1"},
    )


class StatusApi:
    """HTTP handlers over a :class:`~armguard.daemon.follower.KillSwitchFollower`.

    OFREP
    -----
    Flag key ``armguard/<experiment>/<arm>`` (the arm is the last path segment), a boolean that
    is ``true`` while the arm may receive traffic. The evaluation context is accepted and ignored
    (the kill switch is the same for every user). Answers:

    * ``value: true``, ``reason: STATIC``, ``variant: on``: the arm may receive traffic;
    * ``value: false``, ``reason: DISABLED``, ``variant: off``: the arm or its experiment is
      killed or paused;
    * ``reason: ERROR``, ``variant: default``, value = the follower's ``fail_open`` default: the
      follower is still bootstrapping (single evaluation only; bulk answers 503 then);
    * 404 ``{"errorCode": "FLAG_NOT_FOUND"}``: not an armguard key, unknown experiment or arm
      (the SDK then returns the caller's default value);
    * 400 ``{"errorCode": "PARSE_ERROR"}`` for a body that is not a JSON object,
      ``INVALID_CONTEXT`` for a ``context`` that is not an object.

    Bulk evaluation returns every arm of every experiment with an ``ETag``; a request whose
    ``If-None-Match`` matches it is answered 304 with no body.
    """

    def __init__(self, follower: KillSwitchFollower):
        self.follower = follower
        self._bulk_cache: tuple[int, bytes, str] | None = None

    def register(self, server: HttpServer, *, gate_public: bool = False) -> None:
        """Add the routes to the daemon's HTTP server.

        The gate answers GET and POST (Flagger's webhooks POST a JSON payload, ignored here).
        Flagger cannot send a bearer token, so ``gate_public=True`` (setting
        ``integrations.gate_public``) exempts the gate from it; it reveals only pass/fail.
        """
        server.add_route("/v1/experiments", self.list_experiments)
        server.add_route("/v1/experiments/", self.experiment, prefix=True)
        server.add_route(
            "/v1/gate/", self.gate, methods=("GET", "POST"), public=gate_public, prefix=True
        )
        server.add_route("/ofrep/v1/evaluate/flags", self.ofrep_bulk, methods=("POST",))
        server.add_route(
            "/ofrep/v1/evaluate/flags/", self.ofrep_single, methods=("POST",), prefix=True
        )

    # -- status ----------------------------------------------------------------------------------

    def _arms(self, view: ExperimentView, status: ExperimentStatus | None) -> dict[str, Any]:
        out = {}
        for arm, state in view.arms.items():
            gate, _, _ = arm_gate(view, status, arm)
            out[arm] = {"state": state, "allowed": view.allowed[arm], "gate": gate}
        return out

    def list_experiments(self, request: Request) -> Response:
        f = self.follower
        if not f.ready:
            return _not_ready()
        items = []
        for exp in f.table.experiments():
            view, status = f.get(exp), f.status(exp)
            if view is None:
                continue  # a snapshot without a kill-switch event: nothing to obey yet
            items.append(
                {
                    "experiment": exp,
                    "revision": view.revision,
                    "state": view.state,
                    "cause": view.cause,
                    "arms": self._arms(view, status),
                }
            )
        return _json({"ready": True, "lag": f.lag, "count": len(items), "experiments": items})

    def experiment(self, request: Request) -> Response:
        f = self.follower
        if not f.ready:
            return _not_ready()
        rest = request.path[len("/v1/experiments/") :]
        experiment, sep, arm_part = rest.partition("/arms/")
        view = f.get(experiment) if experiment else None
        if view is None:
            return _json({"error": f"unknown experiment {experiment!r}"}, 404)
        status = f.status(experiment)
        if sep:
            if arm_part not in view.arms:
                return _json({"error": f"unknown arm {arm_part!r} of {experiment!r}"}, 404)
            return _json(self._arm_body(view, status, arm_part))
        if "/" in experiment:
            return _json({"error": f"unknown path {request.path!r}"}, 404)
        data = view.data
        st = status.status if status is not None else {}
        body = {
            "experiment": experiment,
            "revision": view.revision,
            "state": view.state,
            "cause": view.cause,
            "event_id": view.event_id,
            "time": view.time,
            "config_version": data.get("config_version"),
            "arms": self._arms(view, status),
            "last_decision": data.get("decision") or st.get("last_decision"),
            "guardrails": _rows(view, status),
            "srm": st.get("srm"),
            "status_revision": status.revision if status is not None else None,
            "status_updated_ts": st.get("updated_ts"),
            "offsets": data.get("offsets"),
        }
        return _json(body)

    def _arm_body(
        self, view: ExperimentView, status: ExperimentStatus | None, arm: str
    ) -> dict[str, Any]:
        gate, reason, rows = arm_gate(view, status, arm)
        return {
            "experiment": view.experiment,
            "arm": arm,
            "gate": gate,
            "allowed": view.allowed[arm],
            "state": view.arms[arm],
            "experiment_state": view.state,
            "revision": view.revision,
            "reason": reason,
            "guardrails": rows,
        }

    def gate(self, request: Request) -> Response:
        f = self.follower
        if not f.ready:
            return _json({"gate": "unavailable", "reason": "follower not ready"}, 503)
        experiment, _, arm = request.path[len("/v1/gate/") :].rpartition("/")
        view = f.get(experiment) if experiment else None
        if view is None or arm not in view.arms:
            return _json({"error": f"unknown experiment or arm {experiment!r}/{arm!r}"}, 404)
        body = self._arm_body(view, f.status(experiment), arm)
        code = _GATE_STATUS[body["gate"]]
        if body["gate"] == "inconclusive" and request.query.get("inconclusive") == ["pass"]:
            code = 200
        return _json(body, code)

    # -- OFREP -----------------------------------------------------------------------------------

    @staticmethod
    def _ofrep_body(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        """The request body, or a 400 answer for a bad one."""
        if not request.body.strip():
            return {}, None
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            return None, _json({"errorCode": "PARSE_ERROR", "errorDetails": str(exc)}, 400)
        if not isinstance(body, dict):
            return None, _json(
                {"errorCode": "PARSE_ERROR", "errorDetails": "the body must be a JSON object"},
                400,
            )
        if "context" in body and not isinstance(body["context"], dict):
            return None, _json(
                {"errorCode": "INVALID_CONTEXT", "errorDetails": "context must be an object"},
                400,
            )
        return body, None

    def _evaluate(self, view: ExperimentView, arm: str) -> dict[str, Any]:
        allowed = view.allowed[arm]
        meta: dict[str, Any] = {
            "experiment": view.experiment,
            "arm": arm,
            "revision": view.revision,
            "experimentState": view.state,
            "armState": view.arms[arm],
        }
        if view.cause:
            meta["cause"] = view.cause
        return {
            "key": flag_key(view.experiment, arm),
            "value": allowed,
            "reason": "STATIC" if allowed else "DISABLED",
            "variant": "on" if allowed else "off",
            "metadata": meta,
        }

    def ofrep_single(self, request: Request) -> Response:
        key = request.path[len("/ofrep/v1/evaluate/flags/") :]
        _, bad = self._ofrep_body(request)
        if bad is not None:
            return _json({"key": key, **orjson.loads(bad.body)}, 400)
        f = self.follower
        parsed = parse_flag_key(key)
        if not f.ready:
            return _json(
                {
                    "key": key,
                    "value": f.fail_open,
                    "reason": "ERROR",
                    "variant": "default",
                    "metadata": {"ready": False},
                }
            )
        view = f.get(parsed[0]) if parsed is not None else None
        if parsed is None or view is None or parsed[1] not in view.arms:
            return _json(
                {
                    "key": key,
                    "errorCode": "FLAG_NOT_FOUND",
                    "errorDetails": (
                        f"{key!r} is not a known flag; armguard flags are "
                        "armguard/<experiment>/<arm>"
                    ),
                },
                404,
            )
        return _json(self._evaluate(view, parsed[1]))

    def ofrep_bulk(self, request: Request) -> Response:
        _, bad = self._ofrep_body(request)
        if bad is not None:
            return bad
        f = self.follower
        if not f.ready:
            return _json(
                {"errorCode": "GENERAL", "errorDetails": "the kill-switch follower is not ready"},
                503,
                {"Retry-After": "1"},
            )
        version = f.table.version
        if self._bulk_cache is None or self._bulk_cache[0] != version:
            flags = []
            for exp in f.table.experiments():
                view = f.get(exp)
                if view is not None:
                    flags.extend(self._evaluate(view, arm) for arm in view.arms)
            body = orjson.dumps({"flags": flags}) + b"\n"
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            self._bulk_cache = (version, body, etag)
        _, body, etag = self._bulk_cache
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(304, b"", "application/json", {"ETag": etag})
        return Response(200, body, "application/json", {"ETag": etag})


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False
