"""The kill switch in a faust table, for services that are faust apps (``pip install armguard[faust]``).

:func:`killswitch_table` adds to a `faust-streaming <https://github.com/faust-streaming/faust>`_
app an agent that follows ``armguard.killswitch`` and a ``GlobalTable`` (every worker holds every
experiment, whichever partitions it owns) with the latest desired state per experiment. Decoding
and the revision rule are the follower's (:func:`~armguard.daemon.follower.parse_killswitch`):
invalid records are skipped and counted, an older revision never replaces a newer one.

armguard writes the kill switch in Kafka transactions, so the app must read it with
``read_committed``: faust does that only for ``processing_guarantee="exactly_once"`` apps run by a
faust worker, and :func:`killswitch_table` refuses any other app (``ValueError``).

This is a client-side helper: nothing in the daemon imports it, so faust stays off armguard's
hot path.

Usage::

    app = faust.App("ranker", broker="kafka://kafka:9092", processing_guarantee="exactly_once")
    kill_switch = killswitch_table(app, topic="armguard.killswitch")

    @app.agent(requests_topic)
    async def serve(stream):
        async for req in stream:
            arm = "treatment" if kill_switch.allowed("ranker-v2", "treatment") else "control"
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .errors import RecordRejected
from .follower import parse_killswitch

__all__ = ["FaustKillSwitch", "killswitch_table"]


class FaustKillSwitch:
    """The agent and the table :func:`killswitch_table` adds to a faust app.

    ``allowed(experiment, arm)`` reads the table: an arm may receive traffic iff its state and
    its experiment's state are ``running``; an experiment or arm the table does not hold answers
    ``fail_open``. The table only holds what the worker has recovered and read, so call it from
    agents and timers of a started worker (faust recovers tables before agents run).
    """

    def __init__(
        self, app: Any, *, topic: str, table_name: str, fail_open: bool, partitions: int | None
    ):
        if not isinstance(fail_open, bool):
            raise ValueError(f"fail_open must be True or False, got {fail_open!r}")
        guarantee = str(getattr(app.conf.processing_guarantee, "value", ""))
        if guarantee != "exactly_once":
            raise ValueError(
                "the kill switch is written in Kafka transactions and must be read with "
                "read_committed: create the faust app with processing_guarantee='exactly_once' "
                f"(got {guarantee!r})"
            )
        self.fail_open = fail_open
        self.skipped: Counter[str] = Counter()
        self.applied = 0
        self.topic = app.topic(topic, key_serializer="raw", value_serializer="raw")
        # Faust writes a table row to the changelog partition of the event being processed, so
        # the changelog needs at least as many partitions as the kill-switch topic.
        self.table = app.GlobalTable(table_name, default=None, partitions=partitions)
        self.agent = app.agent(self.topic, name=f"{table_name}-follower")(self._follow)

    async def _follow(self, stream: Any) -> None:
        async for event in stream.events():
            self.apply(event.key, event.value)

    def apply(self, key: bytes | None, value: bytes | None) -> str:
        """Fold one kill-switch record into the table; returns ``applied`` or the skip reason."""
        try:
            view = parse_killswitch(key, value)
        except RecordRejected as exc:
            self.skipped[exc.reason] += 1
            return exc.reason
        old = self.table.get(view.experiment)
        if old is not None and view.revision <= old["revision"]:
            reason = "duplicate_revision" if view.revision == old["revision"] else "stale_revision"
            self.skipped[reason] += 1
            return reason
        self.table[view.experiment] = {
            "revision": view.revision,
            "state": view.state,
            "arms": dict(view.arms),
            "allowed": dict(view.allowed),
            "cause": view.cause,
        }
        self.applied += 1
        return "applied"

    def allowed(self, experiment: str, arm: str) -> bool:
        entry = self.table.get(experiment)
        if entry is None:
            return self.fail_open
        return bool(entry["allowed"].get(arm, self.fail_open))

    def get(self, experiment: str) -> dict[str, Any] | None:
        """The table's entry for ``experiment``: revision, state, arms, allowed, cause."""
        return self.table.get(experiment)


def killswitch_table(
    app: Any,
    *,
    topic: str = "armguard.killswitch",
    table_name: str = "armguard-killswitch",
    fail_open: bool = True,
    partitions: int | None = None,
) -> FaustKillSwitch:
    """Follow the kill switch into a faust ``GlobalTable`` of ``app`` (see the module).

    ``partitions`` of the table's changelog (default: the app's ``topic_partitions``) must be at
    least the kill-switch topic's.
    """
    return FaustKillSwitch(
        app, topic=topic, table_name=table_name, fail_open=fail_open, partitions=partitions
    )
