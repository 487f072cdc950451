"""Publish kill-switch events in the documented format (COMMON contract), transactionally.

The integration tests of the follower, the status API and OFREP use this until they run against
the evaluate stage itself; it is the same format, so it is a legitimate test of the readers."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer


def killswitch_event(
    experiment: str,
    revision: int,
    arms: Mapping[str, str],
    *,
    state: str = "running",
    cause: str = "guardrail",
    decision: dict[str, Any] | None = None,
    guardrails: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": uuid.uuid5(uuid.NAMESPACE_URL, f"{experiment}/{revision}/{cause}").hex,
        "source": "armguard",
        "type": "armguard.killswitch.v1",
        "subject": experiment,
        "time": "2025-11-28T03:20:00.000Z",
        "datacontenttype": "application/json",
        "data": {
            "experiment": experiment,
            "revision": revision,
            "state": state,
            "arms": dict(arms),
            "cause": cause,
            "decision": decision,
            "guardrails": guardrails or [],
            "config_version": "test",
            "offsets": {"summaries": [], "telemetry": []},
        },
    }


def state_snapshot(
    experiment: str, revision: int, arms: Mapping[str, str], guardrails: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "v": 1,
        "experiment": experiment,
        "revision": revision,
        "config_version": "test",
        "desired": {"state": "running", "arms": dict(arms)},
        "status": {
            "updated_ts": 1764300000.0,
            "guardrails": guardrails,
            "srm": {"p_value": 0.5, "state": "ok"},
            "last_decision": None,
        },
        "internal": {"opaque": True},
    }


def guardrail_row(arm: str, state: str, name: str = "error-proportion") -> dict[str, Any]:
    return {
        "guardrail": name,
        "arm": arm,
        "metric": "error",
        "test": "proportion",
        "state": state,
        "estimate": 0.004,
        "lower": 0.001,
        "upper": 0.007,
        "p_value": 0.2,
        "n_control": 20000,
        "n_treatment": 20000,
    }


async def publish(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[str, Any]],
    *,
    abort: bool = False,
) -> None:
    """Send ``(key, value)`` pairs in one transaction (value: dict -> JSON, bytes as is, None)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"test-killswitch-{uuid.uuid4().hex[:8]}",
        enable_idempotence=True,
        linger_ms=5,
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        futures = []
        for key, value in records:
            payload = value if value is None or isinstance(value, bytes) else orjson.dumps(value)
            futures.append(await producer.send(topic, payload, key=key.encode()))
        if abort:
            await producer.abort_transaction()
        else:
            await producer.commit_transaction()
    finally:
        await producer.stop()
