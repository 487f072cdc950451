"""armguard simulate against the real local broker: every record arrives, keyed records land on
the partition the Java client would choose, pacing holds the rate, and the CLI produces too."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from armguard.daemon.experiments import load_experiments
from armguard.daemon.simulate import BadRecords, ExperimentSpec, Scenario, Simulation
from armguard.daemon.simulate_sinks import Pacer, kafka_partition, produce

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXPS = load_experiments(ROOT / "config" / "demo.yaml")
START = 1_764_300_000.0


async def read_all(
    bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 30.0
):
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        records = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for batch in got.values():
                records.extend(batch)
        return records, sum(ends.values())
    finally:
        await consumer.stop()


async def test_every_record_arrives_on_its_key_partition(kafka_bootstrap, make_topic):
    topic = await make_topic("sim", partitions=3)
    scenario = Scenario(
        seed=5,
        rate=20_000,
        records=20_000,
        units=5_000,
        block_records=3000,
        experiments=[ExperimentSpec(id="ranker-v2")],
        inject=[BadRecords(fraction=0.01)],
    )
    sim = Simulation(scenario, EXPS, start_ts=START)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_batch_size=256 * 1024)
    await producer.start()
    try:
        report = await produce(sim, producer, topic, key_by="unit", timestamps="event")
    finally:
        await producer.stop()
    assert report.records == 20_000
    assert report.bad == sum(int((b.bad >= 0).sum()) for b in sim.batches())
    records, end_total = await read_all(kafka_bootstrap, topic, 3, 20_000)
    assert end_total == 20_000
    assert len(records) == 20_000
    assert sorted(r.value for r in records) == sorted(sim.values())
    for r in records[:2000]:
        assert r.partition == kafka_partition(r.key, 3)
        assert r.key.startswith(b"u")
    # Kafka timestamps are the records' event times (asked for with timestamps="event").
    good = {v for b in sim.batches() for v, bad in zip(b.values, b.bad, strict=True) if bad < 0}
    for r in records:
        if r.value in good:
            assert r.timestamp == round(orjson.loads(r.value)["ts"] * 1000)


async def test_keyed_by_experiment_and_paced(kafka_bootstrap, make_topic):
    topic = await make_topic("sim-paced", partitions=2)
    scenario = Scenario(
        seed=1, rate=4000, records=4000, experiments=[ExperimentSpec(id="ranker-v2")]
    )
    sim = Simulation(scenario, EXPS, start_ts=START)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        started = time.monotonic()
        chunks: list[tuple[int, int]] = []
        report = await produce(
            sim,
            producer,
            topic,
            key_by="experiment",
            pacer=Pacer(4000.0),
            on_chunk=lambda b, start, end: chunks.append((b.first + start, b.first + end)),
        )
        elapsed = time.monotonic() - started
    finally:
        await producer.stop()
    # 4,000 records at 4,000/s: paced over about one second, not sent in a burst (how much
    # slower a loaded machine makes it is not this test's business)
    assert elapsed >= 0.9, elapsed
    assert report.records == 4000 and report.paced
    # paced sends go out in ~20 ms chunks (80 records at 4,000/s), in order, covering everything
    assert chunks[0][0] == 0 and chunks[-1][1] == 4000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert max(end - start for start, end in chunks) <= 80
    records, end_total = await read_all(kafka_bootstrap, topic, 2, 4000)
    assert end_total == 4000 and len(records) == 4000
    assert {r.key for r in records} == {b"ranker-v2"}
    assert {r.partition for r in records} == {kafka_partition(b"ranker-v2", 2)}


async def test_stop_event_ends_an_endless_run(kafka_bootstrap, make_topic):
    topic = await make_topic("sim-stop", partitions=1)
    sim = Simulation(
        Scenario(rate=1000, experiments=[ExperimentSpec(id="ranker-v2")]), EXPS, start_ts=START
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    stop = asyncio.Event()
    try:
        asyncio.get_running_loop().call_later(0.5, stop.set)
        report = await asyncio.wait_for(
            produce(sim, producer, topic, pacer=Pacer(1000.0), stop=stop), timeout=10
        )
    finally:
        await producer.stop()
    assert 200 <= report.records <= 2000
    _, end_total = await read_all(kafka_bootstrap, topic, 1, report.records, timeout_s=5)
    assert end_total == report.records  # what was sent before stopping was delivered


async def test_cli_produces_to_kafka(kafka_bootstrap, make_topic, monkeypatch, capsys):
    from armguard.daemon.cli import main

    topic = await make_topic("sim-cli", partitions=2)
    monkeypatch.setenv("ARMGUARD_KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap)
    argv = ["simulate", "--experiments", str(ROOT / "config" / "demo.yaml")]
    argv += ["--scenario", str(ROOT / "config" / "simulate-demo.yaml")]
    argv += ["--records", "5000", "--kafka", "--topic", topic, "--start-ts", str(START)]
    # main() runs its own event loop: give it a thread of its own.
    assert await asyncio.to_thread(main, argv) == 0
    assert "5000 records" in capsys.readouterr().err
    records, end_total = await read_all(kafka_bootstrap, topic, 2, 5000)
    assert end_total == 5000 and len(records) == 5000
