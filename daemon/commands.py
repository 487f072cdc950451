"""Operator commands: their wire format, signing and verification (pure; no I/O).

A command is a JSON object on ``armguard.commands``, keyed by experiment::

    {"v": 1, "id": "<uuid4 hex>", "command": "kill", "experiment": "ranker-v2", "arm": "treatment",
     "guardrail": null, "duration_s": null, "user": "alice", "reason": "p99 doubled",
     "issued_at": 1764300000.0, "signature": "<hex>"}

``signature`` is HMAC-SHA256, keyed with the shared secret ``commands.hmac_key``, over the
canonical JSON (sorted keys, no spaces) of every other field. A command is applied only when the
signature verifies, the fields are well formed, it is not older than ``commands.max_age_s`` when it
reaches the topic (judged against the record's Kafka timestamp, so replay reaches the same verdict)
and its id has not been seen before (no replays of captured commands).

Examples
--------
>>> cmd = sign(new_command("kill", "ranker-v2", arm="treatment", user="alice",
...                        reason="p99 doubled", issued_at=1764300000.0, id="c1"), b"k3y")
>>> verify(cmd, b"k3y", received_at=1764300001.0, max_age_s=300).command
'kill'
>>> verify(cmd, b"wrong", received_at=1764300001.0, max_age_s=300)
Traceback (most recent call last):
...
armguard.daemon.errors.CommandRejected: bad_signature: the HMAC does not match; is the key right?
"""

from __future__ import annotations

import hashlib
import hmac
import math
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from .errors import CommandRejected

__all__ = ["COMMANDS", "Command", "canonical", "new_command", "parse", "sign", "verify"]

COMMANDS = ("kill", "pause", "resume", "override", "acknowledge")
_MAX_FUTURE_S = 60.0


@dataclass(frozen=True, slots=True)
class Command:
    """A verified operator command."""

    id: str
    command: str
    experiment: str
    arm: str | None
    guardrail: str | None
    duration_s: float | None
    user: str
    reason: str
    issued_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_command(
    command: str,
    experiment: str,
    *,
    user: str,
    reason: str = "",
    arm: str | None = None,
    guardrail: str | None = None,
    duration_s: float | None = None,
    issued_at: float,
    id: str | None = None,
) -> dict[str, Any]:
    """An unsigned command object; ``issued_at`` is the caller's clock (unix seconds)."""
    return {
        "v": 1,
        "id": id or uuid.uuid4().hex,
        "command": command,
        "experiment": experiment,
        "arm": arm,
        "guardrail": guardrail,
        "duration_s": duration_s,
        "user": user,
        "reason": reason,
        "issued_at": issued_at,
    }


def canonical(obj: dict[str, Any]) -> bytes:
    """The bytes the signature covers: every field but ``signature``, sorted keys."""
    body = {k: v for k, v in obj.items() if k != "signature"}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def sign(obj: dict[str, Any], key: bytes) -> dict[str, Any]:
    """Return ``obj`` with its HMAC-SHA256 ``signature``."""
    mac = hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()
    return {**obj, "signature": mac}


def parse(raw: bytes | None) -> dict[str, Any]:
    """Decode a command record's value; raise :class:`CommandRejected` if it is not an object."""
    if raw is None:
        raise CommandRejected("malformed", "empty record")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CommandRejected("malformed", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CommandRejected("malformed", "a command must be a JSON object")
    return obj


def verify(
    obj: dict[str, Any], key: bytes | None, *, received_at: float, max_age_s: float
) -> Command:
    """Authenticate and validate a decoded command; raise :class:`CommandRejected` with a reason."""
    if key is None:
        raise CommandRejected(
            "no_key", "commands.hmac_key is not set, so no command can be authenticated"
        )
    sig = obj.get("signature")
    if not isinstance(sig, str):
        raise CommandRejected("unsigned", "the command has no signature")
    expected = hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sig, expected):
        raise CommandRejected("bad_signature", "the HMAC does not match; is the key right?")
    cmd = obj.get("command")
    if cmd not in COMMANDS:
        raise CommandRejected("malformed", f"command {cmd!r}; allowed: {', '.join(COMMANDS)}")
    for field in ("id", "experiment", "user"):
        if not isinstance(obj.get(field), str) or not obj[field]:
            raise CommandRejected("malformed", f"{field} must be a non-empty string")
    for field in ("arm", "guardrail"):
        if obj.get(field) is not None and not isinstance(obj[field], str):
            raise CommandRejected("malformed", f"{field} must be a string or null")
    reason = obj.get("reason", "")
    if not isinstance(reason, str):
        raise CommandRejected("malformed", "reason must be a string")
    issued = obj.get("issued_at")
    if isinstance(issued, bool) or not isinstance(issued, int | float) or not math.isfinite(issued):
        raise CommandRejected("malformed", "issued_at must be unix seconds")
    if received_at - issued > max_age_s:
        raise CommandRejected(
            "expired", f"issued {received_at - issued:.0f} s before it arrived (max {max_age_s})"
        )
    if issued - received_at > _MAX_FUTURE_S:
        raise CommandRejected("expired", "issued_at is in the future; check the sender's clock")
    duration = obj.get("duration_s")
    if cmd == "override":
        if not obj.get("guardrail"):
            raise CommandRejected("malformed", "override needs the guardrail to silence")
        if (
            isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not (0 < duration <= 30 * 86400)
        ):
            raise CommandRejected(
                "malformed", "override needs duration_s between 0 and 2,592,000 (30 days)"
            )
    return Command(
        id=obj["id"],
        command=cmd,
        experiment=obj["experiment"],
        arm=obj.get("arm"),
        guardrail=obj.get("guardrail"),
        duration_s=float(duration) if isinstance(duration, int | float) else None,
        user=obj["user"],
        reason=reason,
        issued_at=float(issued),
    )
