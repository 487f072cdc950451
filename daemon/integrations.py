"""Wire the kill-switch follower and its HTTP routes into the daemon.

:func:`build_integrations` is what :class:`~armguard.daemon.app.Daemon` calls: it registers the
status API, gate and OFREP routes on the daemon's HTTP server and returns the follower as one more
supervised stage (``name``, ``run(stop)``, ``summary()``). :func:`start_integrations` does the same
for a caller without a supervisor (tests, embedding) and returns a handle with ``stop()``.

Settings: ``integrations.enabled`` (default true), ``integrations.fail_open`` (the answer before
the follower is ready and for unknown experiments), ``integrations.follow_state`` (also follow
``armguard.state`` for guardrail status), ``integrations.poll_timeout_ms``,
``integrations.gate_public`` (serve ``/v1/gate/`` without the bearer token, for Flagger); the topics come from
``topics.killswitch`` and ``topics.state``.
"""

from __future__ import annotations

from typing import Any

from .follower import KillSwitchFollower
from .settings import Settings
from .status_api import StatusApi

__all__ = ["Integrations", "build_integrations", "start_integrations"]


def build_follower(
    settings: Settings, metrics: Any = None, health: Any = None
) -> KillSwitchFollower:
    """The daemon's follower of the whole kill-switch (and state) topic, as settings say."""
    s = settings.integrations
    return KillSwitchFollower(
        settings.kafka,
        topic=settings.topics.killswitch,
        state_topic=settings.topics.state if s.follow_state else None,
        fail_open=s.fail_open,
        poll_timeout_ms=s.poll_timeout_ms,
        metrics=metrics,
        health=health,
    )


def build_integrations(
    settings: Settings, http_server: Any, metrics: Any = None, health: Any = None
) -> list[KillSwitchFollower]:
    """Register the routes on ``http_server``; return the stages to supervise (maybe none)."""
    if not settings.integrations.enabled:
        return []
    follower = build_follower(settings, metrics, health)
    StatusApi(follower).register(http_server, gate_public=settings.integrations.gate_public)
    return [follower]


class Integrations:
    """A running follower with its routes; :meth:`stop` stops it and re-raises its error."""

    def __init__(self, follower: KillSwitchFollower | None):
        self.follower = follower

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        if self.follower is not None:
            await self.follower.wait_ready(timeout_s)

    async def stop(self) -> None:
        if self.follower is not None:
            await self.follower.stop()


async def start_integrations(
    settings: Settings, http_server: Any, metrics: Any = None, health: Any = None
) -> Integrations:
    """Register the routes and start the follower on the running loop (no supervisor needed)."""
    stages = build_integrations(settings, http_server, metrics, health)
    follower = stages[0] if stages else None
    if follower is not None:
        await follower.start()
    return Integrations(follower)
