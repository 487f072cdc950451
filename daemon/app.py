"""The daemon process: builds the components from the settings and supervises them.

Each stage is an object with ``name`` and ``async run(stop: asyncio.Event)``; ``run`` returns when
``stop`` is set (after finishing or aborting its open transaction) and raises on an unknown failure.
The supervisor runs every stage as a task; the first one to fail stops the others and the error is
re-raised on the main path (no fire-and-forget task). SIGTERM and SIGINT set ``stop``; the process
then logs one summary line with its counters and exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry

from .experiments import ExperimentsFile, load_experiments
from .heap import prepare_heap
from .settings import Settings

__all__ = ["Daemon", "Stage"]

log = logging.getLogger("armguard")


class Stage(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None: ...

    def summary(self) -> str: ...


class Daemon:
    """All of armguard in one process: ingest, evaluate and the HTTP server, as settings say."""

    def __init__(
        self,
        settings: Settings,
        experiments: ExperimentsFile | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.settings = settings
        self.experiments = experiments or load_experiments(settings.experiments_file)
        self.registry = registry or CollectorRegistry()
        self.stop = asyncio.Event()
        self._started = time.monotonic()
        from .health import Health
        from .metrics import Metrics

        self.metrics = Metrics(self.registry)
        self.health = Health()
        self.stages: list[Stage] = self._build_stages()

    def _build_stages(self) -> list[Stage]:
        stages: list[Stage] = []
        s = self.settings
        if s.ingest.enabled:
            from .ingest import IngestStage

            stages.append(IngestStage(s, self.experiments, self.metrics, self.health))
        if s.evaluate.enabled:
            from .evaluate import EvaluateStage

            stages.append(EvaluateStage(s, self.experiments, self.metrics, self.health))
        return stages

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            log.info("received %s: stopping fetches, finishing open transactions", sig.name)
        self.stop.set()

    async def ensure_topics(self) -> None:
        """Create armguard's own topics that are missing (not the telemetry topics)."""
        from aiokafka.admin import AIOKafkaAdminClient
        from aiokafka.errors import KafkaError

        from .kafka import ensure_topics, kafka_options

        t = self.settings.topics
        delay = 0.5
        while True:
            admin = AIOKafkaAdminClient(**kafka_options(self.settings.kafka))
            try:
                await admin.start()
                created = await ensure_topics(
                    admin,
                    self.settings,
                    partitions=t.partitions,
                    replication_factor=t.replication_factor,
                )
                break
            except KafkaError as exc:
                # A broker that is not up yet is waited for, not a reason to exit.
                if self.stop.is_set():
                    raise
                log.warning(
                    "cannot reach Kafka at %s (%r); retrying in %.1f s",
                    self.settings.kafka.bootstrap_servers,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)  # back-off between connection attempts
                delay = min(2 * delay, 10.0)
            finally:
                await admin.close()
        if created:
            log.info("created topics: %s", ", ".join(created))

    async def run(self, extra: Sequence[Stage] = ()) -> None:
        from .http import HttpServer

        http = HttpServer(self.settings.http, self.registry, self.health, status=self)
        # Integrations (daemon/integrations.py): the kill-switch follower as one more supervised
        # stage, and its status API, rollout gates and OFREP routes on this server.
        from .integrations import build_integrations

        integrations = build_integrations(self.settings, http, self.metrics, self.health)
        await http.start()  # probes answer (not ready) while the broker is waited for
        if self.settings.topics.create:
            try:
                await self.ensure_topics()
            except BaseException:
                await http.stop()
                raise
        stages = [*self.stages, *integrations, *extra]
        prepare_heap()
        tasks = {asyncio.create_task(st.run(self.stop), name=st.name): st for st in stages}
        try:
            stop_wait = asyncio.create_task(self.stop.wait(), name="stop")
            pending = set(tasks)
            while pending:
                done, _ = await asyncio.wait(
                    pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                for t in done:
                    if t is stop_wait:
                        continue
                    pending.discard(t)
                    if t.exception() is not None:
                        log.error("stage %s failed: %r; stopping", tasks[t].name, t.exception())
                        self.stop.set()
                if stop_wait in done:
                    break
            # Stopping: give the stages the configured time to finish their transactions.
            if pending:
                done, still = await asyncio.wait(pending, timeout=self.settings.shutdown_timeout_s)
                for t in still:
                    log.error(
                        "stage %s did not stop within %.0f s; cancelling",
                        tasks[t].name,
                        self.settings.shutdown_timeout_s,
                    )
                    t.cancel()
                if still:
                    await asyncio.gather(*still, return_exceptions=True)
            stop_wait.cancel()
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            await http.stop()
            for t in tasks:
                if not t.done():
                    t.cancel()
            uptime = time.monotonic() - self._started
            parts = "; ".join(st.summary() for st in stages)
            log.info("armguard stopped after %.1f s: %s", uptime, parts)
