"""Ingest on the real broker: mixed telemetry in, summaries and dead letters out, counts
reconcile, and the summaries equal those of folding the whole input in one go."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from prometheus_client import CollectorRegistry

from armguard.daemon.contract import REASONS, Contract
from armguard.daemon.health import Health
from armguard.daemon.ingest import IngestStage
from armguard.daemon.metrics import Metrics
from armguard.daemon.settings import Settings

from .ingest_support import (
    assert_offsets_tile,
    assert_same_summaries,
    bad_records,
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


async def test_mixed_telemetry_reconciles_and_summaries_equal_one_pass(
    kafka_bootstrap, admin, make_topic, unique
):
    from aiokafka.admin import NewTopic

    topic = f"telemetry-{unique}"
    await admin.create_topics(
        [NewTopic(topic, 2, 1, topic_configs={"max.message.bytes": str(12 * 1024 * 1024)})]
    )
    summaries = await make_topic("summaries", partitions=2)
    deadletter = f"deadletter-{unique}"
    await admin.create_topics(
        [NewTopic(deadletter, 1, 1, topic_configs={"max.message.bytes": str(4 * 1024 * 1024)})]
    )
    group = f"ingest-{unique}"
    now = time.time()
    bad = bad_records(now)
    values: list[bytes | None] = list(good_records(3000, now))
    # Interleave the bad ones so they land in both partitions, between good records.
    expected_dead: dict[str, int] = {}
    step = 0
    for reason, recs in bad.items():
        for r in recs:
            step += 97
            values.insert(step % len(values), r)
            if reason != "skipped":
                expected_dead[reason] = expected_dead.get(reason, 0) + 1
    await produce(kafka_bootstrap, topic, values, partitions=2, max_request_size=12 * 1024 * 1024)
    ends = await end_offsets(kafka_bootstrap, topic, 2)
    assert sum(ends.values()) == len(values)

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    health = Health()
    settings = ingest_settings(kafka_bootstrap, topic, summaries, deadletter, group)
    stage = IngestStage(settings, experiments(), metrics, health)
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        await wait_for(
            lambda: caught_up(admin, group, topic, ends, task), "offsets committed to the end"
        )
        assert health.ready

        def lag(p: int) -> float | None:
            return registry.get_sample_value(
                "armguard_consumer_lag_records",
                {"group": group, "topic": topic, "partition": str(p)},
            )

        await wait_for(lambda: lag(0) == 0 and lag(1) == 0, "consumer lag 0 on both partitions")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    try:
        # Reconciliation: consumed = summarised + dead-lettered + skipped, from the metrics.
        def val(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, {"topic": topic, **labels}) or 0.0

        consumed = val("armguard_records_consumed_total")
        summarised = val("armguard_records_summarised_total")
        dead = {r: val("armguard_records_deadlettered_total", reason=r) for r in REASONS}
        skipped = val("armguard_records_skipped_total", reason="unknown_experiment")
        assert consumed == len(values)
        assert summarised == 3000
        assert skipped == len(bad["skipped"])
        assert consumed == summarised + sum(dead.values()) + skipped
        assert {r: int(n) for r, n in dead.items() if n} == expected_dead
        assert "consumed" in stage.summary()

        # Dead letters: original bytes (null for the 10 MB one), reason and source in headers.
        letters = await read_topic(kafka_bootstrap, deadletter)
        assert len(letters) == sum(expected_dead.values())
        by_reason: dict[str, list] = {}
        for rec in letters:
            h = dict(rec.headers)
            env = orjson.loads(h["armguard.envelope"])
            assert env["reason"] == h["armguard.reason"].decode()
            assert env["source"]["topic"] == topic == h["armguard.source.topic"].decode()
            assert env["source"]["offset"] == int(h["armguard.source.offset"])
            by_reason.setdefault(env["reason"], []).append((rec, env))
        for rec, env in by_reason["too_large"]:
            assert rec.value is None and env["size"] > 10 * 1024 * 1024
            assert not env["value_included"]
        sent = {v for v in values if v is not None and len(v) < 1024 * 1024}
        for reason, items in by_reason.items():
            if reason not in ("too_large", "no_value"):
                assert all(rec.value in sent for rec, _ in items), reason

        # Summaries: merged, they equal one pass over all input; offset ranges never overlap.
        out = await read_topic(kafka_bootstrap, summaries)
        assert {r.key for r in out} == {b"ranker-v2", b"checkout"}
        inputs = await read_topic(kafka_bootstrap, topic)
        by_partition: dict[int, list] = {}
        for r in inputs:
            by_partition.setdefault(r.partition, []).append(r)
        contract = Contract(experiments(), settings.ingest)
        got = merge_summaries([r.value for r in out])
        assert_same_summaries(got, reference(contract, topic, by_partition))
        assert_offsets_tile([r.value for r in out], ends, topic)
        first = orjson.loads(out[0].value)
        assert first["v"] == 2 and first["config_version"] == contract.config_version
        assert first["source"]["topic"] == topic
        assert first["span"]["min_ts"] <= first["span"]["max_ts"] <= now
    finally:
        await admin.delete_topics([topic, deadletter])


async def test_flush_size_bound_splits_transactions(kafka_bootstrap, make_topic, admin, unique):
    """max_pending_records bounds each flush, so memory does not grow with the input rate."""
    topic = await make_topic("telemetry")
    summaries = await make_topic("summaries")
    deadletter = await make_topic("deadletter")
    group = f"ingest-{unique}"
    now = time.time()
    await produce(kafka_bootstrap, topic, list(good_records(2000, now, seed=3)))
    ends = await end_offsets(kafka_bootstrap, topic, 1)
    registry = CollectorRegistry()
    settings = ingest_settings(
        kafka_bootstrap,
        topic,
        summaries,
        deadletter,
        group,
        flush_interval_s=60.0,
        max_pending_records=250,
        max_batch_records=100,
    )
    stage = IngestStage(settings, experiments(), Metrics(registry), Health())
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        await wait_for(lambda: caught_up(admin, group, topic, ends, task), "all committed")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    out = await read_topic(kafka_bootstrap, summaries)
    spans = {(o["first"], o["last"]) for r in out for o in orjson.loads(r.value)["offsets"]}
    assert len(spans) == 8  # 2000 records, at most 250 per transaction
    assert all(last - first + 1 <= 250 for first, last in spans)
    committed_tx = registry.get_sample_value(
        "armguard_transactions_total", {"stage": "ingest", "outcome": "committed"}
    )
    assert committed_tx == 8


async def test_topics_matched_by_a_pattern_are_all_ingested(kafka_bootstrap, admin, unique):
    from aiokafka.admin import NewTopic

    names = [f"tele-{unique}-web", f"tele-{unique}-app"]
    summaries, deadletter = f"sum-{unique}", f"dl-{unique}"
    await admin.create_topics([NewTopic(n, 1, 1) for n in [*names, summaries, deadletter]])
    try:
        now = time.time()
        for i, name in enumerate(names):
            await produce(kafka_bootstrap, name, list(good_records(300, now, seed=i)))
        group = f"ingest-{unique}"
        settings = Settings(
            kafka={"bootstrap_servers": kafka_bootstrap, "session_timeout_ms": 6000},
            topics={
                "telemetry": [],
                "telemetry_pattern": f"tele-{unique}-.*",
                "summaries": summaries,
                "deadletter": deadletter,
            },
            ingest={"group_id": group, "flush_interval_s": 0.3},
        )
        stage = IngestStage(settings, experiments(), Metrics(CollectorRegistry()), Health())
        stop = asyncio.Event()
        task = asyncio.create_task(stage.run(stop))
        try:
            for name in names:
                await wait_for(
                    lambda name=name: caught_up(admin, group, name, {0: 300}, task),
                    f"{name} committed",
                )
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        out = await read_topic(kafka_bootstrap, summaries)
        sources = {orjson.loads(r.value)["source"]["topic"] for r in out}
        assert sources == set(names)
        assert stage.totals["consumed"] == stage.totals["summarised"] == 600
    finally:
        await admin.delete_topics([*names, summaries, deadletter])


async def test_a_fence_while_still_owning_the_partition_is_recovered(
    kafka_bootstrap, admin, make_topic, unique
):
    """A fence without a rebalance (what a transaction timeout does) must not stall the
    partition: after two session timeouts the stage re-acquires it from the committed offset."""
    from aiokafka import AIOKafkaProducer

    from armguard.daemon.ingest import ingest_transactional_id

    topic = await make_topic("telemetry")
    summaries = await make_topic("summaries")
    deadletter = await make_topic("deadletter")
    group = f"ingest-{unique}"
    now = time.time()
    await produce(kafka_bootstrap, topic, list(good_records(500, now, seed=11)))
    settings = ingest_settings(kafka_bootstrap, topic, summaries, deadletter, group)
    stage = IngestStage(settings, experiments(), Metrics(CollectorRegistry()), Health())
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        await wait_for(lambda: caught_up(admin, group, topic, {0: 500}, task), "first 500")
        usurper = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            transactional_id=ingest_transactional_id(group, topic, 0),
        )
        await usurper.start()  # init_transactions bumps the epoch: the stage's producer is fenced
        await usurper.stop()
        await produce(kafka_bootstrap, topic, list(good_records(500, now, seed=12)))
        await wait_for(
            lambda: caught_up(admin, group, topic, {0: 1000}, task), "the rest", timeout_s=60
        )
        assert stage.totals["fenced"] == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    out = [r.value for r in await read_topic(kafka_bootstrap, summaries)]
    assert_offsets_tile(out, {0: 1000}, topic, contiguous=True)
    inputs = await read_topic(kafka_bootstrap, topic)
    contract = Contract(experiments(), settings.ingest)
    assert_same_summaries(merge_summaries(out), reference(contract, topic, {0: inputs}))


async def test_rebalances_between_live_instances_lose_and_duplicate_nothing(
    kafka_bootstrap, admin, make_topic, unique
):
    """A second instance joins mid-stream and the first leaves: each revocation commits what
    was folded, each assignment starts from the committed offset."""
    topic = await make_topic("telemetry", partitions=4)
    summaries = await make_topic("summaries", partitions=2)
    deadletter = await make_topic("deadletter")
    group = f"ingest-{unique}"
    now = time.time()
    settings = ingest_settings(kafka_bootstrap, topic, summaries, deadletter, group)

    def stage() -> IngestStage:
        return IngestStage(settings, experiments(), Metrics(CollectorRegistry()), Health())

    first, second = stage(), stage()
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(first.run(stop_first))]
    sent = 0

    async def send(n: int, seed: int) -> None:
        nonlocal sent
        await produce(kafka_bootstrap, topic, list(good_records(n, now, seed=seed)), partitions=4)
        sent += n

    try:
        await send(2000, 21)
        await wait_for(lambda: first.totals["consumed"] >= 1000, "the first instance to commit")
        tasks.append(asyncio.create_task(second.run(stop_second)))
        await wait_for(lambda: len(second._accs) > 0, "the second instance to get partitions")
        await send(2000, 22)
        await wait_for(lambda: second.totals["consumed"] > 0, "the second instance to commit")
        stop_first.set()  # leaves the group: its partitions move to the second instance
        await asyncio.wait_for(tasks[0], 30)
        await send(2000, 23)
        ends = await end_offsets(kafka_bootstrap, topic, 4)
        await wait_for(lambda: caught_up(admin, group, topic, ends, tasks[1]), "all committed")
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert first.totals["consumed"] + second.totals["consumed"] == sent == 6000
    out = [r.value for r in await read_topic(kafka_bootstrap, summaries)]
    assert_offsets_tile(out, ends, topic, contiguous=True)
    inputs = await read_topic(kafka_bootstrap, topic)
    by_partition: dict[int, list] = {}
    for r in inputs:
        by_partition.setdefault(r.partition, []).append(r)
    contract = Contract(experiments(), settings.ingest)
    assert_same_summaries(merge_summaries(out), reference(contract, topic, by_partition))


async def test_transactional_telemetry_only_committed_records_count(
    kafka_bootstrap, admin, make_topic, unique
):
    """Telemetry written in transactions: ingest (read_committed, on the bare-record fast path)
    summarises the committed records only, never an aborted transaction's, and its committed
    offset moves past the transaction markers so the lag reaches 0."""
    topic = await make_topic("telemetry")
    summaries = await make_topic("summaries")
    deadletter = await make_topic("deadletter")
    group = f"ingest-{unique}"
    now = time.time()
    batches = [good_records(200, now, seed=s) for s in (11, 12, 13, 14)]
    # batch 1 is aborted: it never happened
    plan = [(values, i != 1, [0]) for i, values in enumerate(batches)]
    assert await produce_transactions(kafka_bootstrap, topic, f"writer-{unique}", plan) == 600
    ends = await end_offsets(kafka_bootstrap, topic, 1)
    assert ends[0] == 4 * 200 + 4  # records and one marker per transaction

    registry = CollectorRegistry()
    settings = ingest_settings(kafka_bootstrap, topic, summaries, deadletter, group)
    stage = IngestStage(settings, experiments(), Metrics(registry), Health())
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        await wait_for(
            lambda: caught_up(admin, group, topic, ends, task), "offsets committed to the end"
        )
        lag = {"group": group, "topic": topic, "partition": "0"}
        await wait_for(
            lambda: registry.get_sample_value("armguard_consumer_lag_records", lag) == 0,
            "consumer lag 0",
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert stage.totals["consumed"] == stage.totals["summarised"] == 600
    out = await read_topic(kafka_bootstrap, summaries)
    inputs = await read_topic(kafka_bootstrap, topic)
    assert {r.value for r in inputs} == set(batches[0] + batches[2] + batches[3])
    contract = Contract(experiments(), settings.ingest)
    assert_same_summaries(
        merge_summaries([r.value for r in out]), reference(contract, topic, {0: inputs})
    )
