"""Review of the committed-position bookkeeping (b23938d) against rebalances and fences:
telemetry written in transactions (commit markers, aborted transactions) leaves offsets that
hold no record, which ingest now commits past, in offsets-only transactions where nothing else
is pending. Across a rebalance and a fence no committed record may be lost or counted twice,
and the committed offsets must still reach the end of every partition."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import NewTopic
from prometheus_client import CollectorRegistry

from armguard.daemon.contract import Contract
from armguard.daemon.health import Health
from armguard.daemon.ingest import IngestStage, ingest_transactional_id
from armguard.daemon.metrics import Metrics
from armguard.daemon.settings import Settings

from .ingest_support import (
    assert_offsets_tile,
    assert_same_summaries,
    caught_up,
    end_offsets,
    experiments,
    good_records,
    ingest_settings,
    merge_summaries,
    produce,
    produce_transactions,
    read_topic,
    reference,
    wait_for,
)

pytestmark = pytest.mark.integration


async def test_transactional_telemetry_across_rebalances_counts_each_record_once(
    kafka_bootstrap, admin, make_topic, unique
):
    """Markers and aborted transactions on every partition while a second instance joins and
    the first leaves: each committed record is summarised exactly once, no aborted one, and
    the committed offsets reach the end (past the last markers) on every partition."""
    topic = await make_topic("telemetry", partitions=4)
    summaries = await make_topic("summaries", partitions=2)
    deadletter = await make_topic("deadletter")
    group = f"ingest-{unique}"
    writer = f"writer-{unique}"
    now = time.time()
    settings = ingest_settings(kafka_bootstrap, topic, summaries, deadletter, group)
    everywhere = [0, 1, 2, 3]
    seed = iter(range(300, 400))

    def plan(n_tx: int, *, abort_every: int) -> list[tuple[list[bytes], bool, list[int]]]:
        return [
            (good_records(120, now, seed=next(seed)), (i + 1) % abort_every != 0, everywhere)
            for i in range(n_tx)
        ]

    def stage() -> IngestStage:
        return IngestStage(settings, experiments(), Metrics(CollectorRegistry()), Health())

    first, second = stage(), stage()
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(first.run(stop_first))]
    sent = 0
    try:
        sent += await produce_transactions(kafka_bootstrap, topic, writer, plan(8, abort_every=3))
        await wait_for(lambda: first.totals["consumed"] > 0, "the first instance to commit")
        tasks.append(asyncio.create_task(second.run(stop_second)))
        await wait_for(lambda: len(second._accs) > 0, "the second instance to get partitions")
        sent += await produce_transactions(kafka_bootstrap, topic, writer, plan(8, abort_every=2))
        await wait_for(lambda: second.totals["consumed"] > 0, "the second instance to commit")
        stop_first.set()  # leaves the group: its partitions move to the second instance
        await asyncio.wait_for(tasks[0], 30)
        # Last: an aborted transaction on two partitions only (they end in an abort marker,
        # with no record after the last committed one), then a committed one on the others.
        sent += await produce_transactions(
            kafka_bootstrap,
            topic,
            writer,
            [
                (good_records(60, now, seed=next(seed)), False, [0, 1]),
                (good_records(60, now, seed=next(seed)), True, [2, 3]),
            ],
        )
        ends = await end_offsets(kafka_bootstrap, topic, 4)
        await wait_for(lambda: caught_up(admin, group, topic, ends, *tasks), "committed to the end")
    finally:
        stop_first.set()
        stop_second.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for r in results if r is not None] == []
    assert first.totals["consumed"] + second.totals["consumed"] == sent
    assert first.totals["summarised"] + second.totals["summarised"] == sent
    out = [r.value for r in await read_topic(kafka_bootstrap, summaries)]
    assert_offsets_tile(out, ends, topic)
    inputs = await read_topic(kafka_bootstrap, topic)
    assert len(inputs) == sent
    by_partition: dict[int, list] = {}
    for r in inputs:
        by_partition.setdefault(r.partition, []).append(r)
    contract = Contract(experiments(), settings.ingest)
    assert_same_summaries(merge_summaries(out), reference(contract, topic, by_partition))


async def test_an_offsets_only_commit_refused_by_a_fence_is_recovered(
    kafka_bootstrap, admin, make_topic, unique
):
    """After a fence, the next thing the partition commits is an offsets-only transaction
    (only an aborted transaction arrived): its refusal drops the partition like a refused
    data flush, nothing is counted, and the re-acquired partition commits past the markers."""
    topic = await make_topic("telemetry")
    summaries = await make_topic("summaries")
    deadletter = await make_topic("deadletter")
    group = f"ingest-{unique}"
    writer = f"writer-{unique}"
    now = time.time()
    first_batch = good_records(200, now, seed=31)
    await produce_transactions(kafka_bootstrap, topic, writer, [(first_batch, True, [0])])
    registry = CollectorRegistry()
    settings = ingest_settings(kafka_bootstrap, topic, summaries, deadletter, group)
    stage = IngestStage(settings, experiments(), Metrics(registry), Health())
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        ends = await end_offsets(kafka_bootstrap, topic, 1)
        assert ends == {0: 201}  # 200 records and the commit marker
        await wait_for(lambda: caught_up(admin, group, topic, ends, task), "the first 200")
        usurper = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            transactional_id=ingest_transactional_id(group, topic, 0),
        )
        await usurper.start()  # init_transactions bumps the epoch: the stage's producer is fenced
        await usurper.stop()
        # Nothing visible arrives, only offsets to pass: 100 aborted records and their marker.
        await produce_transactions(
            kafka_bootstrap, topic, writer, [(good_records(100, now, seed=32), False, [0])]
        )
        ends = await end_offsets(kafka_bootstrap, topic, 1)
        assert ends == {0: 302}
        await wait_for(
            lambda: caught_up(admin, group, topic, ends, task),
            "the re-acquired partition to commit past the aborted transaction",
        )
        assert stage.totals["fenced"] == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert stage.totals["consumed"] == stage.totals["summarised"] == 200
    out = [r.value for r in await read_topic(kafka_bootstrap, summaries)]
    assert_offsets_tile(out, ends, topic)
    inputs = await read_topic(kafka_bootstrap, topic)
    assert {r.value for r in inputs} == set(first_batch)
    contract = Contract(experiments(), settings.ingest)
    assert_same_summaries(merge_summaries(out), reference(contract, topic, {0: inputs}))


class _HookedStage(IngestStage):
    """Runs ``hook`` once at the top of a main-loop flush check (the stage's lock held), so a
    test can change the consumer's subscription exactly where a metadata update may land."""

    hook = None

    async def _flush_due(self) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook(self)
        await super()._flush_due()


async def _pattern_stage(kafka_bootstrap, admin, unique):
    a, b = f"tele-{unique}-a", f"tele-{unique}-b"
    summaries, deadletter = f"sum-{unique}", f"dl-{unique}"
    await admin.create_topics([NewTopic(n, 1, 1) for n in [a, summaries, deadletter]])
    await produce(kafka_bootstrap, a, list(good_records(300, time.time(), seed=1)))
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "session_timeout_ms": 6000},
        topics={
            "telemetry": [],
            "telemetry_pattern": f"tele-{unique}-.*",
            "summaries": summaries,
            "deadletter": deadletter,
        },
        ingest={"group_id": f"ingest-{unique}", "flush_interval_s": 0.3},
    )
    stage = _HookedStage(settings, experiments(), Metrics(CollectorRegistry()), Health())
    return stage, a, b, [a, b, summaries, deadletter]


def _new_matching_topic(admin, b: str, then=None):
    async def hook(stage: IngestStage) -> None:
        await admin.create_topics([NewTopic(b, 1, 1)])
        consumer = stage._consumer

        async def changed() -> bool:
            await consumer._client.force_metadata_update()
            return b in consumer.subscription()

        await wait_for(changed, "the pattern subscription to gain the new topic")
        if then is not None:
            then()

    return hook


async def test_a_topic_that_starts_matching_the_pattern_mid_run_is_ingested_too(
    kafka_bootstrap, admin, unique
):
    """The subscription changes (a new telemetry topic) between the revocation it causes and
    the main loop's lag export: the stage must not touch the old partitions as if assigned."""
    stage, a, b, topics = await _pattern_stage(kafka_bootstrap, admin, unique)
    group = f"ingest-{unique}"
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        await wait_for(lambda: caught_up(admin, group, a, {0: 300}, task), "topic a")
        stage.hook = _new_matching_topic(admin, b)
        await wait_for(lambda: stage.hook is None, "the subscription change")
        await produce(kafka_bootstrap, b, list(good_records(300, time.time(), seed=2)))
        await wait_for(lambda: caught_up(admin, group, b, {0: 300}, task), "topic b")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
        await admin.delete_topics(topics)
    task.result()
    assert stage.totals["consumed"] == stage.totals["summarised"] == 600


async def test_a_stop_during_a_rebalance_leaves_no_producer_running(kafka_bootstrap, admin, unique):
    """SIGTERM while the group rebalances: the rejoin that consumer.stop() waits out must not
    acquire partitions (start transactional producers) that nobody stops."""
    stage, a, b, topics = await _pattern_stage(kafka_bootstrap, admin, unique)
    group = f"ingest-{unique}"
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        await wait_for(lambda: caught_up(admin, group, a, {0: 300}, task), "topic a")
        stage.hook = _new_matching_topic(admin, b, then=stop.set)
        await asyncio.wait_for(task, 30)
        left = sorted(map(str, stage._producers))
        for tp in list(stage._producers):
            await stage._producers.pop(tp).stop()
        assert left == [], f"producers started during shutdown and never stopped: {left}"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
        await admin.delete_topics(topics)
