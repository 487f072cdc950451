"""Stage 1, ingest: the Kafka edge around :class:`~armguard.daemon.contract.PartitionAccumulator`.

It consumes the telemetry topics (names or a pattern) in a consumer group, ``read_committed``,
in ``getmany`` batches, and folds each partition's records into that partition's accumulator.
A partition is flushed every ``flush_interval_s``, when it holds ``max_pending_records``, when
all partitions together hold that many (memory stays bounded whatever the input rate: while a
flush runs nothing is fetched into the accumulators), on revocation and on shutdown. A flush is
one Kafka transaction of that partition's own transactional producer: one summary record per
experiment to ``armguard.summaries``, the dead letters to ``armguard.deadletter`` and the
partition's consumed offset (``send_offsets_to_transaction``).

Exactly once, across crashes, restarts, rebalances and zombies:

* The ``transactional.id`` is ``<group>-<topic>-<partition>``. On assignment the new owner
  starts that producer first (``init_transactions`` fences any zombie still holding it and
  aborts or completes its open transaction), then reads the partition's committed offset and
  starts there. A zombie's later commit fails with ``ProducerFenced``; it drops the partition.
* aiokafka fetches committed positions before the assignment callback runs, so the committed
  offset read after ``init_transactions`` is what makes the start final: the accumulator folds
  nothing below it, and the consumer seeks to it when its position is behind it (or not known
  yet). A position at or past it is kept, so what aiokafka fetched ahead is not dropped and
  fetched again: under a new assignment the position moves only by records ``getmany``
  returned, which the main loop folds into the new accumulator.
* A batch fetched while a rebalance ran is folded, never dropped (dropping it would leave the
  consumer's position past records nobody folded): aiokafka returns only records fetched at the
  current position of a current assignment, and an accumulator ignores offsets it already
  folded; the consumer then continues after what was folded rather than fetching it again.
  Records of a partition without an accumulator (not ours, or fenced) are ignored; the
  next owner, or the re-acquisition, starts from the committed offset.
* The committed offset is the consumer's position, not just past the last record: offsets with
  no record (transaction markers, aborted transactions of a transactional telemetry producer)
  are passed too, so lag reaches 0 and a restart does not fetch them again (an idle partition
  whose position moved only past markers commits in an offsets-only transaction).
* A producer fenced while the group still assigns its partition to us (a transaction that
  outlived ``transaction_timeout_ms``) is re-acquired after two session timeouts: a real zombie
  would have lost the partition in a rebalance by then.
* If a flush fails for another reason, its transaction is aborted, the partition rewinds to
  the first offset of the flush and the records are folded again; after
  ``_MAX_CONSECUTIVE_FAILURES`` failures in a row the stage stops loudly.

Reconciliation: per topic, ``records_consumed = records_summarised + records_deadlettered +
records_skipped``; the counters move when a transaction commits, so aborted work is not counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)

from . import bare_records
from .contract import Contract, Flush, PartitionAccumulator, deadletter_headers
from .errors import KafkaUnavailable
from .experiments import ExperimentsFile
from .health import Health
from .heap import gc_paused
from .kafka import (
    consumer_group_options,
    kafka_options,
    retrieve_exception,
    transactional_producer_options,
)
from .metrics import Metrics
from .partitioner import partitions_of
from .settings import Settings

__all__ = ["IngestStage", "ingest_transactional_id"]

log = logging.getLogger("armguard.ingest")

_FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)
_MAX_CONSECUTIVE_FAILURES = 5


def ingest_transactional_id(group_id: str, topic: str, partition: int) -> str:
    """The transactional id of the producer that owns one input partition."""
    return f"{group_id}-{topic}-{partition}"


class _Listener(ConsumerRebalanceListener):
    """aiokafka logs and swallows exceptions of these callbacks; the stage re-raises them."""

    def __init__(self, stage: IngestStage):
        self.stage = stage

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self.stage._revoke(set(revoked))
        except Exception as exc:
            self.stage._listener_error = exc

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            await self.stage._assign(set(assigned))
        except Exception as exc:
            self.stage._listener_error = exc


class IngestStage:
    """Telemetry in; summaries, dead letters and offsets out, one transaction per flush."""

    name = "ingest"

    def __init__(
        self,
        settings: Settings,
        experiments: ExperimentsFile,
        metrics: Metrics,
        health: Health,
    ):
        self.settings = settings
        self.cfg = settings.ingest
        self.topics = settings.topics
        self.metrics = metrics
        self.health = health
        self.contract = Contract(experiments, self.cfg)
        self._kafka = kafka_options(settings.kafka)
        self._consumer: AIOKafkaConsumer | None = None
        self._accs: dict[TopicPartition, PartitionAccumulator] = {}
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._flushed_at: dict[TopicPartition, float] = {}
        self._lock = asyncio.Lock()
        self._generation = 0
        self._listener_error: BaseException | None = None
        self._closing = False  # set when the loop ends: no partition is acquired after it
        self._failures = 0
        self._fenced: dict[TopicPartition, float] = {}  # partition -> when its producer was fenced
        self._sought: set[TopicPartition] = set()  # sought to the committed offset since _settle
        self._commit_pos: dict[TopicPartition, int | None] = {}  # offset committed, per partition
        self._partition_cache: dict[tuple[bytes, int], int] = {}
        # Totals for the shutdown line, counted at commit like the metrics.
        self.totals: dict[str, int] = defaultdict(int)

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.health.set_ready(self.name, False)
        # The output topics exist: the Daemon creates armguard's topics (topics.create).
        bare_records.enable()  # records without a ConsumerRecord each (see bare_records)
        consumer = AIOKafkaConsumer(
            **self._kafka,
            **consumer_group_options(self.settings.kafka),
            group_id=self.cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            fetch_max_bytes=self.cfg.fetch_max_bytes,
            max_partition_fetch_bytes=self.cfg.max_partition_fetch_bytes,
            max_poll_records=self.cfg.max_batch_records,
            value_deserializer=bare_records.bare_value,
        )
        self._consumer = consumer
        await consumer.start()
        try:
            if self.topics.telemetry_pattern:
                consumer.subscribe(pattern=self.topics.telemetry_pattern, listener=_Listener(self))
            else:
                consumer.subscribe(topics=list(self.topics.telemetry), listener=_Listener(self))
            stall = max(30.0, 3 * self.cfg.flush_interval_s)
            while not stop.is_set():
                self._check_listener()
                self.health.beat(self.name, stall_after_s=stall)
                # Never fetch more than fits under the flush bound: pending records (and so
                # memory) stay at most max_pending_records; _flush_due made room.
                room = self.cfg.max_pending_records - sum(a.pending for a in self._accs.values())
                with gc_paused():
                    await self._consume(
                        consumer, stop, max(1, min(self.cfg.max_batch_records, room))
                    )
                if not consumer.assignment() and self._generation:
                    self.health.set_ready(self.name, True)  # joined, owning nothing
                self._export_lag(consumer)
            # SIGTERM: no more fetching; commit what was folded, then leave the group.
            async with self._lock:
                for tp in list(self._accs):
                    await self._flush(tp)
        finally:
            self._closing = True
            self.health.done(self.name)
            self.health.set_ready(self.name, False)
            async with self._lock:
                for tp in list(self._producers):
                    await self._close_partition(tp)
            # stop() waits for the group coordinator, which may still run a rebalance's
            # callbacks; _assign acquires nothing once closing, and whatever a callback left
            # is closed after it.
            await consumer.stop()
            async with self._lock:
                for tp in list(self._producers):
                    await self._close_partition(tp)
            self._consumer = None

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event, limit: int) -> None:
        """Fetch a batch, fold it, and flush what is due.

        Runs with the cyclic collector paused (the caller's :func:`gc_paused`): a batch is up to
        ``max_batch_records`` tracked record objects that die by reference counting right after
        the fold, and with the collector on they were traversed by young collections while
        being built and folded (and promoted to be traversed again). The batch is dropped here,
        before the collector resumes.
        """
        batches = await _fetch_unless_stopped(
            consumer.getmany(timeout_ms=self.cfg.poll_timeout_ms, max_records=limit), stop
        )
        generation = self._generation
        positions = self._positions(consumer)
        self._check_listener()
        async with self._lock:
            if batches:
                started = time.perf_counter()
                self._fold(batches)
                self.metrics.batch_duration.labels(stage=self.name).observe(
                    time.perf_counter() - started
                )
            self._settle(consumer, generation, positions, batches)
            del batches
            await self._flush_due()
            await self._recover_fenced(consumer)

    def summary(self) -> str:
        t = self.totals
        return (
            f"ingest: {t['consumed']} consumed = {t['summarised']} summarised + "
            f"{t['deadlettered']} dead-lettered + {t['skipped']} skipped; "
            f"{t['transactions']} transactions, {t['summaries']} summaries, "
            f"{t['aborted']} aborted, {t['fenced']} fenced"
        )

    def _check_listener(self) -> None:
        if self._listener_error is not None:
            exc, self._listener_error = self._listener_error, None
            raise exc

    # -- partitions ---------------------------------------------------------------------------
    async def _assign(self, assigned: set[TopicPartition]) -> None:
        self.health.set_ready(self.name, False)
        async with self._lock:
            self._generation += 1
            if self._closing:  # stopping: the next owner starts from the committed offsets
                return
            self._fenced.clear()  # a new assignment re-acquires whatever it holds
            new = sorted(assigned - set(self._producers))
            await self._acquire(new)
            log.info("assigned %d partition(s): %s", len(new), _names(new))
        self.health.set_ready(self.name, True)

    async def _acquire(self, tps: list[TopicPartition], *, rewind: bool = False) -> None:
        """Take ownership: start each partition's producer, then start from its committed offset
        (``rewind``: seek there whatever the position, for a partition this instance was
        already consuming under the same assignment)."""
        consumer = self._consumer
        assert consumer is not None
        producers = {
            tp: AIOKafkaProducer(
                **transactional_producer_options(
                    self.settings,
                    ingest_transactional_id(self.cfg.group_id, tp.topic, tp.partition),
                )
            )
            for tp in tps
        }
        # init_transactions (in start) fences a zombie holding the id and settles its open
        # transaction; only then is the committed offset final.
        results = await asyncio.gather(
            *(p.start() for p in producers.values()), return_exceptions=True
        )
        for res in results:
            if isinstance(res, BaseException):
                for q in producers.values():
                    await q.stop()
                raise res
        for tp in tps:
            self._producers[tp] = producers[tp]
            committed = await consumer.committed(tp)
            # The accumulator folds nothing below the committed offset. The consumer seeks
            # there only if its position is behind it (read before a zombie's last commit) or
            # not known yet: a seek drops what aiokafka fetched ahead, so it is not repeated
            # when the position is already right. A position past the committed offset was
            # reached by records getmany returned under this assignment, which the main loop
            # holds (waiting for the lock) and folds into this accumulator: a rebalance gives
            # the partition a new assignment, whose position starts from the committed offset.
            # Without a committed offset the position comes from auto_offset_reset=earliest.
            # A re-acquisition under the same assignment (after a fence) rewinds: the position
            # is past records the dropped accumulator folded and never committed.
            position = None if rewind else _position_now(consumer, tp)
            if rewind and committed is None:
                await consumer.seek_to_beginning(tp)
                self._sought.add(tp)
            elif committed is not None and (position is None or position < committed):
                consumer.seek(tp, committed)
                self._sought.add(tp)
            acc = PartitionAccumulator(self.contract, tp.topic, tp.partition)
            acc.next_offset = committed
            self._accs[tp] = acc
            self._flushed_at[tp] = time.monotonic()
            self._commit_pos[tp] = committed
        self._generation += 1  # positions read before these seeks are stale: see _settle

    async def _recover_fenced(self, consumer: AIOKafkaConsumer) -> None:
        """Re-acquire partitions whose producer was fenced while the group still gives them to
        us. A zombie learns within a session timeout that it lost its partitions (a rebalance
        revokes them); if the group still assigns a partition well after that, the fence came
        from a transaction timeout, and no other instance can own the partition."""
        if not self._fenced:
            return
        owned = consumer.assignment()
        grace = 2 * self.settings.kafka.session_timeout_ms / 1000
        now = time.monotonic()
        due = []
        for tp, at in list(self._fenced.items()):
            if tp not in owned or tp in self._producers:
                del self._fenced[tp]
            elif now - at >= grace:
                del self._fenced[tp]
                due.append(tp)
        if due:
            log.warning("re-acquiring %s, still assigned after a fence", _names(due))
            await self._acquire(sorted(due), rewind=True)

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            self._generation += 1
            for tp in sorted(revoked & set(self._producers)):
                # Commit what was folded: the next owner starts right after it.
                await self._flush(tp)
                await self._close_partition(tp)
            self._generation += 1

    async def _close_partition(self, tp: TopicPartition) -> None:
        self._accs.pop(tp, None)
        self._flushed_at.pop(tp, None)
        self._commit_pos.pop(tp, None)
        self._sought.discard(tp)
        self.metrics.consumer_lag.remove(self.cfg.group_id, tp.topic, str(tp.partition))
        producer = self._producers.pop(tp, None)
        if producer is not None:
            await producer.stop()

    # -- the hot path -------------------------------------------------------------------------
    def _fold(self, batches: dict[TopicPartition, list[Any]]) -> None:
        # A batch fetched across a rebalance is folded too, never dropped: dropping it would
        # leave the consumer's position past records that were never folded. aiokafka only
        # returns records fetched at the current position (which _acquire set to the committed
        # offset), and an accumulator ignores offsets it already folded.
        accs = self._accs
        for tp, records in batches.items():
            acc = accs.get(tp)
            if acc is not None:  # else: not ours (any more); its owner starts from the commit
                acc.fold(records)

    def _positions(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
        """The consumer's position in each partition that has an accumulator and a valid
        position, read without waiting: ``consumer.position()`` waits while an offset reset is
        pending, and one partition whose reset cannot finish would hold up every other one. A
        partition left out has returned no record since its reset began, so nothing is lost.
        (aiokafka has no public synchronous read of a position; this reads its subscription
        state, and reads nothing, leaving commits at the last record, if that changes.)"""
        out = {}
        for tp in self._accs:
            position = _position_now(consumer, tp)
            if position is not None:
                out[tp] = position
        return out

    def _settle(
        self,
        consumer: AIOKafkaConsumer,
        generation: int,
        positions: dict[TopicPartition, int],
        batches: dict[TopicPartition, list[Any]],
    ) -> None:
        """Line the accumulators up with the consumer's positions after a fold.

        ``positions`` were read right after the ``getmany`` that returned ``batches``. If no
        rebalance ran since (same ``generation``), every record before a position was returned
        and folded, so offsets an accumulator has not folded below it hold no record (transaction
        markers, aborted transactions' records): the accumulator moves past them, so the
        committed offset and the lag reach the end of a partition written in transactions.

        If a rebalance ran meanwhile, a partition it acquired whose position was behind the
        committed offset was sought there after the batch was fetched (``_sought``); the
        accumulator folded the part of that batch at or past the committed offset, so the
        consumer continues after it instead of fetching it again.
        """
        accs = self._accs
        if generation == self._generation:
            for tp, position in positions.items():
                acc = accs.get(tp)
                if acc is not None and (acc.next_offset is None or position > acc.next_offset):
                    acc.next_offset = position
        else:
            # A subscription change (a new topic matching the pattern) empties the assignment
            # before the revocation callback runs: seeking such a partition would raise.
            owned = consumer.assignment()
            for tp in self._sought:
                acc = accs.get(tp)
                if acc is not None and acc.pending and tp in batches and tp in owned:
                    assert acc.next_offset is not None
                    consumer.seek(tp, acc.next_offset)
        self._sought.clear()

    async def _flush_due(self) -> None:
        if not self._accs:
            return
        now = time.monotonic()
        interval = self.cfg.flush_interval_s
        limit = self.cfg.max_pending_records
        total = sum(a.pending for a in self._accs.values())
        for tp, acc in list(self._accs.items()):
            if not acc.pending and not self._uncommitted(tp, acc):
                self._flushed_at[tp] = now
                continue
            if total >= limit or acc.pending >= limit or now - self._flushed_at[tp] >= interval:
                await self._flush(tp)

    def _uncommitted(self, tp: TopicPartition, acc: PartitionAccumulator) -> bool:
        """Whether the accumulator is past the committed offset (with nothing folded: only
        offsets that hold no record, such as transaction markers)."""
        committed = self._commit_pos.get(tp)
        return acc.next_offset is not None and (committed is None or acc.next_offset > committed)

    async def _flush(self, tp: TopicPartition) -> None:
        """One transaction: the partition's summaries, dead letters and consumed offset."""
        acc = self._accs.get(tp)
        producer = self._producers.get(tp)
        if acc is None or producer is None:
            return
        self._flushed_at[tp] = time.monotonic()
        flush = acc.drain()
        if flush is None and not self._uncommitted(tp, acc):
            return
        # Past the last folded record when the consumer passed transaction markers after it.
        commit = acc.next_offset
        assert commit is not None
        started = time.perf_counter()
        sent: list[asyncio.Future[Any]] = []
        try:
            # The context aborts on an error unless the producer is fenced (fatal).
            async with producer.transaction():
                if flush is not None:
                    await self._send(producer, flush, sent)
                await producer.send_offsets_to_transaction({tp: commit}, self.cfg.group_id)
        except _FENCED as exc:
            # Another instance owns the partition now; what was folded is its to re-read.
            log.warning("%s: fenced (%r); dropping the partition", _name(tp), exc)
            self.totals["fenced"] += 1
            self.metrics.transactions.labels(stage=self.name, outcome="failed").inc()
            await self._close_partition(tp)
            self._fenced[tp] = time.monotonic()
            return
        except KafkaError as exc:
            self._failures += 1
            self.totals["aborted"] += 1
            self.metrics.transactions.labels(stage=self.name, outcome="aborted").inc()
            log.warning(
                "%s: flush failed (%r), aborted; %s",
                _name(tp),
                exc,
                f"rewinding to offset {flush.first_offset}" if flush else "offsets only, retried",
            )
            if self._failures >= _MAX_CONSECUTIVE_FAILURES:
                raise KafkaUnavailable(
                    f"{self._failures} flushes in a row failed; last: {exc!r}"
                ) from exc
            if flush is not None:
                acc.next_offset = flush.first_offset
                consumer = self._consumer
                if consumer is not None and tp in consumer.assignment():
                    consumer.seek(tp, flush.first_offset)
                # else: being revoked; the next owner starts from the committed offset
            return
        finally:
            # A failed transaction fails every send's future too; the error is handled above.
            for f in sent:
                f.add_done_callback(retrieve_exception)
        self._failures = 0
        self._commit_pos[tp] = commit
        if flush is None:
            self.metrics.transactions.labels(stage=self.name, outcome="committed").inc()
            self.totals["transactions"] += 1
            return
        self._committed(flush, time.perf_counter() - started)

    async def _send(
        self, producer: AIOKafkaProducer, flush: Flush, sent: list[asyncio.Future[Any]]
    ) -> None:
        summaries_topic = self.topics.summaries
        if flush.summaries:
            # One producer batch per output partition instead of one send() per summary: with
            # 10,000 experiments a flush writes 10,000 records and send() alone would cost more
            # than summarising them. Keys go where Kafka's default partitioner puts them.
            n = len(await producer.partitions_for(summaries_topic))
            by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
            keys = [key for key, _ in flush.summaries]
            for p, kv in zip(self._partition_of(keys, n), flush.summaries, strict=True):
                by_partition[p].append(kv)
            for partition, items in sorted(by_partition.items()):
                builder = producer.create_batch()
                for key, value in items:
                    if builder.append(key=key, value=value, timestamp=None) is None:
                        if builder.record_count():
                            sent.append(
                                await producer.send_batch(
                                    builder, summaries_topic, partition=partition
                                )
                            )
                        builder = producer.create_batch()
                        if builder.append(key=key, value=value, timestamp=None) is None:
                            # Larger than a batch: send() takes up to max_request_size.
                            sent.append(
                                await producer.send(
                                    summaries_topic, value, key=key, partition=partition
                                )
                            )
                            builder = producer.create_batch()
                if builder.record_count():
                    sent.append(
                        await producer.send_batch(builder, summaries_topic, partition=partition)
                    )
        if flush.deadletters:
            dl_topic = self.topics.deadletter
            for d in flush.deadletters:
                value, headers = deadletter_headers(
                    d,
                    topic=flush.topic,
                    partition=flush.partition,
                    config_version=self.contract.config_version,
                    max_record_bytes=self.cfg.max_record_bytes,
                )
                key = d.record.key
                if value is None and key is None:
                    key = b""  # Kafka needs a key or a value; the headers say where it came from
                sent.append(await producer.send(dl_topic, value, key=key, headers=headers))

    def _partition_of(self, keys: list[bytes], partitions: int) -> list[int]:
        """Kafka's default partitioner (murmur2 of the key) of each key, cached per experiment.

        Keys not seen before are hashed in one numpy pass: a first flush of 10,000 experiments
        costs ~1 ms instead of ~20 ms of aiokafka's pure-Python murmur2, key by key.
        """
        cache = self._partition_cache
        out = [cache.get((key, partitions), -1) for key in keys]
        missing = [i for i, p in enumerate(out) if p < 0]
        if missing:
            new = partitions_of([keys[i] for i in missing], partitions).tolist()
            for i, p in zip(missing, new, strict=True):
                out[i] = cache[(keys[i], partitions)] = p
        return out

    def _committed(self, flush: Flush, seconds: float) -> None:
        m = self.metrics
        topic = flush.topic
        m.transactions.labels(stage=self.name, outcome="committed").inc()
        m.transaction_duration.labels(stage=self.name).observe(seconds)
        m.records_consumed.labels(topic=topic).inc(flush.consumed)
        if flush.summarised:
            m.records_summarised.labels(topic=topic).inc(flush.summarised)
        dead = flush.deadlettered
        for reason, n in dead.items():
            m.records_deadlettered.labels(topic=topic, reason=reason).inc(n)
        for reason, n in flush.skipped.items():
            m.records_skipped.labels(topic=topic, reason=reason).inc(n)
        if flush.summaries:
            m.summaries_written.inc(len(flush.summaries))
        t = self.totals
        t["transactions"] += 1
        t["summaries"] += len(flush.summaries)
        t["summary_bytes"] += sum(len(v) for _, v in flush.summaries)
        t["consumed"] += flush.consumed
        t["summarised"] += flush.summarised
        t["deadlettered"] += sum(dead.values())
        t["skipped"] += sum(flush.skipped.values())

    def _export_lag(self, consumer: AIOKafkaConsumer) -> None:
        # Partitions a subscription change unassigned, before their revocation callback ran,
        # have no offsets to read (aiokafka asserts they are assigned).
        owned = consumer.assignment()
        for tp, acc in self._accs.items():
            if tp not in owned:
                continue
            # read_committed: the last stable offset is the end this consumer can reach.
            high = consumer.last_stable_offset(tp)
            if high is None:
                high = consumer.highwater(tp)
            if high is None or acc.next_offset is None:
                continue
            self.metrics.consumer_lag.labels(
                group=self.cfg.group_id, topic=tp.topic, partition=str(tp.partition)
            ).set(max(0, high - acc.next_offset))


def _position_now(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position in ``tp`` if it is assigned and valid, without waiting (None
    also if aiokafka's subscription state no longer looks as expected)."""
    subscription = getattr(consumer._subscription, "subscription", None)
    assignment = getattr(subscription, "assignment", None)
    state_value = getattr(assignment, "state_value", None)
    if state_value is None:
        return None
    state = state_value(tp)
    if state is None or not getattr(state, "has_valid_position", False):
        return None
    return state.position


async def _fetch_unless_stopped(
    fetch: Coroutine[Any, Any, dict[TopicPartition, list[Any]]], stop: asyncio.Event
) -> dict[TopicPartition, list[Any]]:
    """``getmany``'s batches, or none as soon as ``stop`` is set: shutdown does not wait out
    the poll timeout. Cancelling a ``getmany`` that is still waiting loses nothing: it takes
    records from its buffers and returns them without awaiting in between, so a pending one
    has taken none."""
    if stop.is_set():
        fetch.close()
        return {}
    task = asyncio.ensure_future(fetch)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))  # never raises the task's own cancellation
    if task.cancelled():
        return {}
    return task.result()


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _names(tps: list[TopicPartition]) -> str:
    return ", ".join(_name(tp) for tp in tps) or "none"
