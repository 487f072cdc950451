"""CloudEvents 1.0 for the kill switch and the audit log: deterministic ids, event-time stamps.

An event's id is a hash of what identifies it (experiment, revision, cause), so a restarted daemon
that re-derives the same decision writes the same id and a downstream consumer can deduplicate.
Its ``time`` is the event time of the data the decision rests on, never the wall clock, so replay
reproduces events bit for bit.

Examples
--------
>>> ev = cloud_event("armguard.killswitch.v1", "ranker-v2", {"state": "killed"},
...                  id_parts=("ranker-v2", 3, "guardrail"), event_time=1764300000.5)
>>> ev["id"], ev["time"], ev["subject"]
('7387da4a9664425629ff941be27389a6', '2025-11-28T03:20:00.500Z', 'ranker-v2')
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

__all__ = ["DECISION_TYPE", "KILLSWITCH_TYPE", "cloud_event", "event_id", "rfc3339"]

KILLSWITCH_TYPE = "armguard.killswitch.v1"
DECISION_TYPE = "armguard.decision.v1"


def event_id(*parts: object) -> str:
    """A deterministic 128-bit id from the parts that identify an event."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def rfc3339(ts: float | None) -> str:
    """Unix seconds to RFC 3339 UTC with milliseconds; the epoch when unknown."""
    dt = datetime.fromtimestamp(ts or 0.0, tz=UTC)
    # The year with four digits: glibc's %Y writes year 1 as "1", not RFC 3339's "0001".
    return f"{dt.year:04d}" + dt.strftime("-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def cloud_event(
    type_: str,
    subject: str,
    data: dict[str, Any],
    *,
    id_parts: tuple[object, ...],
    event_time: float | None,
    source: str = "armguard",
) -> dict[str, Any]:
    """A CloudEvents 1.0 structured-mode event."""
    return {
        "specversion": "1.0",
        "id": event_id(type_, *id_parts),
        "source": source,
        "type": type_,
        "subject": subject,
        "time": rfc3339(event_time),
        "datacontenttype": "application/json",
        "data": data,
    }
