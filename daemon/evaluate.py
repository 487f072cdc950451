"""Stage 2, evaluate: the Kafka edge around :class:`~armguard.daemon.engine.Engine`.

It consumes ``armguard.summaries`` and ``armguard.commands`` in one consumer group with the range
assignor, so partition *p* of both topics (co-partitioned: same partition count, keyed by
experiment) lands on one owner. For each owned partition number it keeps one transactional
producer whose ``transactional.id`` is derived from the group and *p*: when a partition moves, the
new owner's ``init_transactions`` fences the old one, so a zombie cannot commit. Each fetched batch
of a partition is one transaction holding the kill-switch events, the decisions, the new state
snapshots of the experiments it touched and the consumed offsets of both topics.

On assignment the state of *p* is restored from partition *p* of the compacted ``armguard.state``
topic (read_committed, to its last stable offset) before any input of *p* is processed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, ProducerFenced

from .contract import DeadLetter, deadletter_headers
from .engine import SEVERITY, Engine, Output, Unreadable
from .errors import ConfigError, ConfigProblem
from .experiments import ExperimentsFile
from .health import Health
from .heap import gc_paused, refreeze_heap
from .kafka import kafka_options, retrieve_exception, transactional_producer_options
from .metrics import GuardrailSample, Metrics
from .settings import Settings

__all__ = ["EvaluateStage"]

log = logging.getLogger("armguard.evaluate")

_RESTORE_FETCH_BYTES = 16 * 1024 * 1024


# Engine counters of summary records that were skipped -> the reason label of
# armguard_records_skipped_total{topic=<summaries topic>}.
_SKIPPED_SUMMARIES = {
    "summaries_invalid": "invalid_summary",
    "summaries_unknown_experiment": "unknown_experiment",
}


class _Listener(ConsumerRebalanceListener):
    def __init__(self, stage: EvaluateStage):
        self.stage = stage

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.stage._revoke({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.stage._assign({tp.partition for tp in assigned})


class EvaluateStage:
    """Summaries and commands in; kill switch, decisions and state out, exactly once."""

    name = "evaluate"

    def __init__(
        self,
        settings: Settings,
        experiments: ExperimentsFile,
        metrics: Metrics,
        health: Health,
    ):
        self.settings = settings
        self.cfg = settings.evaluate
        self.topics = settings.topics
        self.metrics = metrics
        self.health = health
        key = settings.commands.hmac_key
        self.engine = Engine(
            experiments,
            evaluation_interval_s=self.cfg.evaluation_interval_s,
            hmac_key=key.get_secret_value().encode() if key is not None else None,
            command_max_age_s=settings.commands.max_age_s,
        )
        self._kafka = kafka_options(settings.kafka)
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._owner: dict[str, int] = {}  # experiment -> partition number
        self._next: dict[TopicPartition, int] = {}  # first input offset not yet committed
        self._lock = asyncio.Lock()
        self._refreeze = False  # freeze once the restored experiments are decoded
        self._consumer: AIOKafkaConsumer | None = None
        self.restore_seconds: list[float] = []
        # Series of rare events exist from the start at 0, so that the alerts' increase()
        # sees their first event (a series first scraped at 1 increases by nothing).
        metrics.records_deadlettered.labels(topic=self.topics.state, reason="unreadable_snapshot")
        for reason in _SKIPPED_SUMMARIES.values():
            metrics.records_skipped.labels(topic=self.topics.summaries, reason=reason)
        metrics.set_experiments([e.id for e in experiments.experiments])
        metrics.set_guardrail_provider(self._samples)

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.health.set_ready(self.name, False)
        consumer = AIOKafkaConsumer(
            **self._kafka,
            group_id=self.cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=self.settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.settings.kafka.heartbeat_interval_ms,
            max_poll_interval_ms=self.settings.kafka.max_poll_interval_ms,
        )
        self._consumer = consumer
        await consumer.start()
        try:
            await self._check_copartitioned()
            consumer.subscribe(
                [self.topics.summaries, self.topics.commands], listener=_Listener(self)
            )
            stall = max(30.0, 3 * self.cfg.poll_timeout_ms / 1000)
            while not stop.is_set():
                self.health.beat(self.name, stall_after_s=stall)
                batches = await consumer.getmany(timeout_ms=self.cfg.poll_timeout_ms)
                if not consumer.assignment():
                    # Joined but owning nothing (more instances than partitions): still ready.
                    self.health.set_ready(self.name, True)
                if batches:
                    await self._process(batches)
                elif self.engine.pending:
                    # Idle: decode stashed snapshots a slice at a time, so their guardrail
                    # state is exported soon without stalling the loop.
                    async with self._lock:
                        self.engine.restore_pending(200)
                        await self._settle_unreadable()
                if self._refreeze and not self.engine.pending:
                    # The restored experiments are decoded and live as long as the partition:
                    # out of the cyclic GC's scans (daemon/app.py).
                    self._refreeze = False
                    refreeze_heap()
                await self._export_lag(consumer)
        finally:
            self.health.done(self.name)
            async with self._lock:
                for p in list(self._producers):
                    await self._close_partition(p)
            await consumer.stop()
            self._consumer = None

    async def _check_copartitioned(self) -> None:
        """Summaries, commands and state must have one partition count: partition p of each
        holds the same experiments, which is what lets one owner restore and apply them."""
        from aiokafka.admin import AIOKafkaAdminClient

        t = self.topics
        admin = AIOKafkaAdminClient(**self._kafka)
        await admin.start()
        try:
            described = await admin.describe_topics([t.summaries, t.commands, t.state])
        finally:
            await admin.close()
        counts = {d["topic"]: len(d.get("partitions") or ()) for d in described}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            detail = ", ".join(f"{n}: {c}" for n, c in counts.items())
            raise ConfigError(
                [
                    ConfigProblem(
                        "kafka",
                        "topics",
                        f"summaries, commands and state need the same partition count ({detail}); "
                        "recreate them with the same `topics.partitions`",
                    )
                ]
            )

    def summary(self) -> str:
        c = self.engine.counters
        return (
            f"evaluate: {c['summaries']} summaries ({c['summaries_invalid']} invalid and "
            f"{c['summaries_unknown_experiment']} of unknown experiments skipped), "
            f"{c['killswitch_events']} kill-switch events, "
            f"{c['decisions']} decisions, {c['commands_applied']} commands applied, "
            f"{c['commands_rejected']} rejected, {c['snapshots_unreadable']} state snapshots "
            "unreadable"
        )

    # -- partitions ---------------------------------------------------------------------------
    async def _assign(self, partitions: set[int]) -> None:
        self.health.set_ready(self.name, False)
        async with self._lock:
            for p in sorted(partitions - set(self._producers)):
                await self._open_partition(p)
            self._refreeze = True
        self.health.set_ready(self.name, True)

    async def _open_partition(self, p: int) -> None:
        producer = AIOKafkaProducer(
            **transactional_producer_options(
                self.settings, f"{self.cfg.group_id}-{self.topics.summaries}-{p}"
            )
        )
        # init_transactions (in start) fences any zombie holding this partition's id and
        # aborts its open transaction, so the state read below is the last committed one.
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producers[p] = producer
        started = time.monotonic()
        await self._restore(p)
        elapsed = time.monotonic() - started
        self.restore_seconds.append(elapsed)
        self.metrics.state_restore_duration.observe(elapsed)
        await self._sync_positions(p)

    async def _sync_positions(self, p: int) -> None:
        """Start partition p's inputs at their committed offsets, read *after*
        init_transactions: aiokafka fetched positions before the rebalance callback, and a
        zombie's transaction that was still committing then may have moved them since.
        Records before these positions (a batch fetched before the rebalance) are skipped."""
        consumer = self._consumer
        if consumer is None:
            return
        for topic in (self.topics.summaries, self.topics.commands):
            tp = TopicPartition(topic, p)
            if tp not in consumer.assignment():
                continue
            committed = await consumer.committed(tp)
            if committed is None:
                committed = (await consumer.beginning_offsets([tp]))[tp]
            consumer.seek(tp, committed)
            self._next[tp] = committed

    async def _revoke(self, partitions: set[int]) -> None:
        async with self._lock:
            for p in sorted(partitions & set(self._producers)):
                await self._close_partition(p)

    async def _close_partition(self, p: int) -> None:
        for tp in [tp for tp in self._next if tp.partition == p]:
            del self._next[tp]
        owned = {e for e, q in self._owner.items() if q == p}
        self.engine.drop(owned)
        for e in owned:
            del self._owner[e]
        producer = self._producers.pop(p, None)
        if producer is not None:
            await producer.stop()

    async def _restore(self, p: int) -> None:
        tp = TopicPartition(self.topics.state, p)
        reader = AIOKafkaConsumer(
            **self._kafka,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            # Loading snapshots keeps the loop busy between fetches, so aiokafka's prefetch does
            # not hide the round trips: 16 MiB per fetch instead of 1 MiB saves ~0.5 s (10%) at
            # 10,000 experiments (186 MiB of state; bench/decision_latency.py, medians of 6 A/B).
            max_partition_fetch_bytes=_RESTORE_FETCH_BYTES,
            fetch_max_bytes=_RESTORE_FETCH_BYTES,
        )
        await reader.start()
        n = 0
        # Snapshots are stashed as bytes (decoded on first use or in idle time), so a partition
        # is ready once its state topic is read. The cyclic GC stays paused meanwhile: decoding
        # eagerly added ~90 tracked objects per experiment and GC passes cost as much as the
        # loading (bench/decision_latency.py), and stashing still allocates per record.
        try:
            with gc_paused():
                reader.assign([tp])
                await reader.seek_to_beginning(tp)
                end = (await reader.end_offsets([tp]))[tp]
                while await reader.position(tp) < end:
                    batch = await reader.getmany(tp, timeout_ms=1000, max_records=10_000)
                    for rec in batch.get(tp, []):
                        if rec.value is None or rec.key is None:
                            continue
                        # Stashed, decoded on first use or in idle time (restore_pending).
                        exp = rec.key.decode("utf-8", "replace")
                        if self.engine.stash(exp, rec.value, (p, rec.offset, rec.timestamp)):
                            self._owner[exp] = p
                            n += 1
        finally:
            await reader.stop()
        log.info("restored %d snapshots of partition %d from %s", n, p, self.topics.state)

    # -- processing ---------------------------------------------------------------------------
    async def _process(self, batches: dict[TopicPartition, list[Any]]) -> None:
        by_partition: dict[int, list[tuple[TopicPartition, Any]]] = defaultdict(list)
        for tp, records in batches.items():
            for rec in records:
                by_partition[tp.partition].append((tp, rec))
        for p, items in sorted(by_partition.items()):
            async with self._lock:
                if p not in self._producers:
                    continue  # revoked while we were fetching; the new owner processes it
                await self._or_recover(p, self._process_partition(p, items))

    async def _or_recover(self, p: int, work: Awaitable[None]) -> None:
        """Await partition ``p``'s transactional ``work``; if its transaction fails, rebuild
        the partition from its last commit (``_recover``)."""
        try:
            await work
        except ProducerFenced:
            # Another instance owns this partition now: we are the zombie. Stop loudly;
            # the orchestrator restarts us and the group gives us fresh partitions.
            raise
        except KafkaError as exc:
            log.warning("partition %d: transaction failed (%r); recovering", p, exc)
            self.metrics.transactions.labels(stage=self.name, outcome="aborted").inc()
            await self._recover(p)

    async def _recover(self, p: int) -> None:
        """Redo partition p from its last commit: the in-memory state ran ahead of what was
        committed, so it is rebuilt from the state topic and the input is re-read from the
        committed offsets (Kafka Streams does the same with a corrupted task)."""
        delay = 0.5
        while True:
            try:
                await self._close_partition(p)
                await self._open_partition(p)
                log.info("partition %d recovered from its last committed state", p)
                return
            except ProducerFenced:
                raise
            except KafkaError as exc:
                log.warning("partition %d: recovery failed (%r); retrying in %.1f s", p, exc, delay)
                self.health.beat(self.name)
                await asyncio.sleep(delay)  # back-off between reconnection attempts
                delay = min(delay * 2, 10.0)

    async def _process_partition(self, p: int, items: list[tuple[TopicPartition, Any]]) -> None:
        started = time.monotonic()
        items = [(tp, rec) for tp, rec in items if rec.offset >= self._next.get(tp, 0)]
        if not items:
            return
        counters = self.engine.counters
        rejected_before = {k: counters[k] for k in _SKIPPED_SUMMARIES}
        # Commands and summaries of one partition are applied in (timestamp, topic, offset)
        # order: a pure function of the input, so replay and restarts agree.
        items.sort(key=lambda it: (it[1].timestamp, it[0].topic, it[1].offset))
        outputs: list[Output] = []
        offsets: dict[TopicPartition, int] = {}
        summaries = self.topics.summaries
        i = 0
        while i < len(items):
            tp, rec = items[i]
            if tp.topic == summaries:
                # A run of summaries between two commands is applied at once: the drift
                # detectors of every experiment that ticks in it update in one vectorised pass,
                # with the decisions of applying the records one by one.
                j = i + 1
                while j < len(items) and items[j][0].topic == summaries:
                    j += 1
                run = items[i:j]
                i = j
                results = self.engine.apply_summaries(
                    [(r.value or b"", t.topic, p, r.offset) for t, r in run],
                    keys=[r.key or b"" for _, r in run],
                )
                for (t, r), outs in zip(run, results, strict=True):
                    offsets[t] = max(offsets.get(t, 0), r.offset + 1)
                    outputs.extend(outs)
                    key = r.key.decode("utf-8", "replace") if r.key else None
                    if key is not None and key in self.engine.states:
                        self._owner[key] = p
                continue
            i += 1
            offsets[tp] = max(offsets.get(tp, 0), rec.offset + 1)
            outputs.extend(
                self.engine.apply_command(
                    rec.value,
                    topic=tp.topic,
                    partition=p,
                    offset=rec.offset,
                    timestamp_s=rec.timestamp / 1000.0,
                )
            )
            for cmd, outcome in self.engine.command_outcomes:
                self.metrics.commands.labels(command=cmd, outcome=outcome).inc()
            self.engine.command_outcomes.clear()
            for e in self.engine.dirty:
                self._owner[e] = p
        outputs.extend(self._deadletters(p))
        outputs.extend(self.engine.snapshots())
        await self._commit(p, outputs, offsets)
        self._next.update(offsets)
        # Summary records the engine could not use (malformed, or of an experiment that is not
        # configured) are skipped, never silent: counted once their batch is committed.
        for key, reason in _SKIPPED_SUMMARIES.items():
            n = counters[key] - rejected_before[key]
            if n:
                self.metrics.records_skipped.labels(topic=summaries, reason=reason).inc(n)
        self.metrics.batch_duration.labels(stage=self.name).observe(time.monotonic() - started)

    # -- unreadable snapshots -------------------------------------------------------------------
    def _deadletters(self, p: int) -> list[Output]:
        """Dead-letter records of the snapshots of partition ``p``'s experiments that could not
        be restored (``Engine.take_unreadable``), each logged once. The experiment goes on from
        what was kept (``ExperimentState.salvage``); its next snapshot replaces the bad one."""
        owned = {u.experiment for u in self.engine.unreadable if self._owner.get(u.experiment) == p}
        out = []
        for u in self.engine.take_unreadable(owned) if owned else []:
            log.error(
                "the state snapshot of experiment %s could not be restored (%s); it starts "
                "again from its desired state and operator history (kept: %s), its detectors "
                "fresh; the snapshot goes to %s",
                u.experiment,
                u.reason,
                ", ".join(u.kept) or "nothing",
                self.topics.deadletter,
            )
            out.append(self._deadletter(p, u))
            self.engine.dirty.add(u.experiment)  # its readable snapshot goes in the same commit
        return out

    def _deadletter(self, p: int, u: Unreadable) -> Output:
        partition, offset, timestamp = u.source if u.source is not None else (p, -1, None)
        record = SimpleNamespace(value=u.value, offset=offset, timestamp=timestamp)
        detail = f"{u.reason}; kept: {', '.join(u.kept) or 'nothing'}"
        value, headers = deadletter_headers(
            DeadLetter(record, "unreadable_snapshot", detail),
            topic=self.topics.state,
            partition=partition,
            config_version=self.engine.version,
            max_record_bytes=self.settings.ingest.max_record_bytes,
        )
        return Output(
            "deadletter",
            u.experiment.encode(),
            value,  # None past ingest.max_record_bytes: the headers point at the source
            outcome="unreadable_snapshot",
            headers=tuple(headers),
        )

    async def _settle_unreadable(self) -> None:
        """Snapshots found unreadable while decoding in idle time: their dead-letter records and
        the experiments' new snapshots, one transaction per partition, at once (nothing else
        would write them until the experiment's next record). A failed transaction recovers
        the partition as a failed batch does: it is read again, and the snapshot with it."""
        for p in sorted({self._owner.get(u.experiment, -1) for u in self.engine.unreadable}):
            if p not in self._producers:
                continue
            outputs = self._deadletters(p)
            for o in list(outputs):
                experiment = o.key.decode()
                self.engine.dirty.discard(experiment)
                snap = self.engine.snapshot_of(experiment)
                if snap is not None:
                    outputs.append(snap)
            await self._or_recover(p, self._commit(p, outputs, {}))

    async def _commit(
        self, p: int, outputs: list[Output], offsets: dict[TopicPartition, int]
    ) -> None:
        producer = self._producers[p]
        topic_of = {
            "killswitch": self.topics.killswitch,
            "decisions": self.topics.decisions,
            "state": self.topics.state,
            "deadletter": self.topics.deadletter,
        }
        started = time.monotonic()
        futures: list[asyncio.Future[Any]] = []
        try:
            async with producer.transaction():
                for o in outputs:
                    futures.append(
                        await producer.send(topic_of[o.kind], o.value, key=o.key, partition=p)
                        if o.kind == "state"
                        else await producer.send(
                            topic_of[o.kind], o.value, key=o.key, headers=list(o.headers) or None
                        )
                    )
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self.cfg.group_id)
            for f in futures:
                await f
        except Exception:
            # A failed transaction fails its sends' futures too; the error is raised below.
            for f in futures:
                f.add_done_callback(retrieve_exception)
            self.metrics.transactions.labels(stage=self.name, outcome="failed").inc()
            raise
        self.metrics.transactions.labels(stage=self.name, outcome="committed").inc()
        self.metrics.transaction_duration.labels(stage=self.name).observe(
            time.monotonic() - started
        )
        for o in outputs:
            if o.kind == "killswitch":
                self.metrics.killswitch_events.labels(
                    experiment=o.key.decode(), action=o.outcome
                ).inc()
            elif o.kind == "decisions":
                self.metrics.decisions.labels(experiment=o.key.decode(), outcome=o.outcome).inc()
            elif o.kind == "deadletter":
                self.metrics.records_deadlettered.labels(
                    topic=self.topics.state, reason=o.outcome
                ).inc()

    async def _export_lag(self, consumer: AIOKafkaConsumer) -> None:
        for tp in consumer.assignment():
            end = consumer.last_stable_offset(tp)
            if end is None:
                continue
            position = await consumer.position(tp)  # local once the position is known
            self.metrics.consumer_lag.labels(
                group=self.cfg.group_id, topic=tp.topic, partition=str(tp.partition)
            ).set(max(0, end - position))

    # -- metrics ------------------------------------------------------------------------------
    def _samples(self) -> list[GuardrailSample]:
        out = []
        for st in self.engine.states.values():
            for r in st.runners.values():
                s = r.status
                out.append(
                    GuardrailSample(
                        experiment=st.id,
                        arm=r.arm,
                        guardrail=r.g.name,
                        test=r.g.test,
                        state=st.guardrail_state(r),
                        estimate=s.estimate,
                        lower=s.lower,
                        upper=s.upper,
                        p_value=s.p_value,
                        score=s.score,
                        threshold=s.threshold,
                        experiment_state=_arm_effective(st.state, st.arm_states.get(r.arm)),
                        shadow=r.g.shadow,
                    )
                )
            if st.srm is not None:
                out.append(
                    GuardrailSample(
                        experiment=st.id,
                        arm="all",
                        guardrail="srm",
                        test="srm",
                        state=st.srm.level,
                        p_value=st.srm.p_value,
                        experiment_state=st.state,
                        shadow=st.srm.cfg.shadow,
                    )
                )
        return out


def _arm_effective(exp_state: str, arm_state: str | None) -> str:
    a = arm_state or "running"
    return a if SEVERITY[a] > SEVERITY[exp_state] else exp_state
