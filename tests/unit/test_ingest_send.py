"""IngestStage._send: every summary lands, once and in order, in the partition Kafka's default
partitioner gives its key (what the evaluate stage's consumers assume), without a broker."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from armguard.daemon.contract import Flush
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.health import Health
from armguard.daemon.ingest import IngestStage
from armguard.daemon.metrics import Metrics
from armguard.daemon.partitioner import partitions_of
from armguard.daemon.settings import Settings

EXPERIMENTS = parse_experiments(
    """
experiments:
  - id: a
    control: control
    arms: {control: 0.5, treatment: 0.5}
""",
    where="inline.yaml",
)


def _stage() -> IngestStage:
    settings = Settings(kafka={"bootstrap_servers": "127.0.0.1:1"})
    return IngestStage(settings, EXPERIMENTS, Metrics(CollectorRegistry()), Health())


class _Producer:
    """What _send uses of AIOKafkaProducer; batches small enough that some fill up."""

    def __init__(self, partitions: int, batch_size: int = 16_384) -> None:
        self.partitions = partitions
        self.batch_size = batch_size
        self.sent: list[tuple[int, list[tuple[bytes, bytes]]]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0, is_transactional=True)

    async def send_batch(self, builder: BatchBuilder, topic: str, *, partition: int):
        records = DefaultRecordBatch(bytes(builder._build()))
        self.sent.append((partition, [(r.key, r.value) for r in records]))
        return asyncio.get_running_loop().create_future()

    async def send(self, topic: str, value: bytes, *, key: bytes, partition: int):
        self.sent.append((partition, [(key, value)]))
        return asyncio.get_running_loop().create_future()


def _flush(summaries: list[tuple[bytes, bytes]]) -> Flush:
    return Flush("t", 0, 0, 1, summaries, [], 2, 2)


async def _send(stage: IngestStage, producer: _Producer, flush: Flush) -> None:
    sent: list[asyncio.Future] = []
    await stage._send(producer, flush, sent)
    for f in sent:
        f.cancel()


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.binary(max_size=40), max_size=40), partitions=st.integers(1, 1000))
def test_partitions_of_is_kafkas_default_partitioner(keys, partitions):
    want = [(murmur2(k) & 0x7FFFFFFF) % partitions for k in keys]
    assert partitions_of(keys, partitions).tolist() == want


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=1, max_size=40), unique=True, max_size=60),
    partitions=st.integers(1, 7),
)
def test_partition_of_is_kafkas_default_partitioner(keys, partitions):
    stage = _stage()
    want = [(murmur2(k) & 0x7FFFFFFF) % partitions for k in keys]
    assert stage._partition_of(keys, partitions) == want  # hashed (cold)
    assert stage._partition_of(keys, partitions) == want  # cached (warm)
    assert stage._partition_of(keys[::-1], partitions) == want[::-1]


def test_send_puts_each_summary_once_in_its_keys_partition_in_order():
    rng = np.random.default_rng(3)
    summaries = sorted(
        (f"exp-{i:05d}".encode(), orjson.dumps({"v": 2, "pad": "x" * int(rng.integers(0, 3000))}))
        for i in range(400)
    )
    summaries.append((b"huge", b"y" * 40_000))  # larger than a batch: sent on its own
    stage = _stage()
    for _ in range(2):  # partitions hashed, then cached
        producer = _Producer(partitions=3)
        asyncio.run(_send(stage, producer, _flush(summaries)))
        assert len(producer.sent) > 3  # batches filled up and were sent on
        got: dict[int, list[tuple[bytes, bytes]]] = {}
        for partition, records in producer.sent:
            got.setdefault(partition, []).extend(records)
        for partition, records in got.items():
            want = [kv for kv in summaries if (murmur2(kv[0]) & 0x7FFFFFFF) % 3 == partition]
            assert records == want
        assert sum(len(r) for r in got.values()) == len(summaries)
