"""The ingest consumer's bare-record fast path (daemon/bare_records.py) on aiokafka's own
record-batch parser: it must be active on the installed aiokafka (a silent fall-back would only
show as a slower bench), hand out records with the attributes ingest reads, equal to those of
a ``ConsumerRecord``, and leave every other consumer's records alone."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord

from armguard.daemon import bare_records
from armguard.daemon.contract import Contract, PartitionAccumulator
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.settings import IngestSettings

TP = TopicPartition("telemetry", 3)
READ_COMMITTED = 1


def _batch(base_offset: int, values: list[bytes | None]) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i, v in enumerate(values):
        key = None if i % 2 else f"k{i}".encode()
        assert builder.append(i, timestamp=1_700_000_000_000 + i, key=key, value=v, headers=[])
    buf = builder.build()
    buf[0:8] = base_offset.to_bytes(8, "big")  # the broker assigns the batch's base offset
    return bytes(buf)


def _records(data: bytes, fetch_offset: int, value_deserializer: object) -> list[object]:
    parts = fetcher.PartitionRecords(
        TP,
        MemoryRecords(data),
        None,
        fetch_offset,
        None,
        value_deserializer,
        True,
        READ_COMMITTED,
    )
    return list(parts)


VALUES = [b'{"experiment": "e"}', None, b"\xff not json", b"[]", b"{}"]


def test_the_fast_path_is_active_on_the_installed_aiokafka():
    assert bare_records.enable() is True
    assert bare_records.enabled() is True
    assert bare_records.enable() is True  # idempotent: installed once
    assert fetcher.PartitionRecords.__name__ == "BarePartitionRecords"


def test_bare_records_carry_what_ingest_reads_equal_to_consumer_records():
    bare_records.enable()
    data = _batch(100, VALUES)
    bare = _records(data, 100, bare_records.bare_value)
    full = _records(data, 100, None)
    assert [type(r) for r in full] == [ConsumerRecord] * len(VALUES)
    assert not any(isinstance(r, ConsumerRecord) for r in bare)
    assert len(bare) == len(full) == len(VALUES)
    for b, f in zip(bare, full, strict=True):
        assert (b.offset, b.value, b.key, b.timestamp) == (f.offset, f.value, f.key, f.timestamp)
    assert [r.offset for r in bare] == [100, 101, 102, 103, 104]


def test_positions_inside_a_batch_are_aiokafkas():
    # A fetch from the middle of a batch skips the records before the fetch offset.
    bare_records.enable()
    data = _batch(100, VALUES)
    assert [r.offset for r in _records(data, 102, bare_records.bare_value)] == [102, 103, 104]


def test_bare_value_is_an_identity_deserializer():
    # Without the fast path aiokafka calls it on every value: the records stay correct.
    for v in VALUES:
        assert bare_records.bare_value(v) is v


EXPERIMENTS = parse_experiments(
    """
experiments:
  - id: checkout
    control: control
    arms: {control: 0.5, treatment: 0.5}
    metrics:
      latency_ms: {min: 0, max: 600000}
""",
    where="test.yaml",
)


def test_the_accumulator_folds_bare_records_like_consumer_records():
    bare_records.enable()
    contract = Contract(EXPERIMENTS, IngestSettings())
    now = 1_700_000_000.0
    values = [
        b'{"experiment":"checkout","arm":"control","ts":1700000000,"metrics":{"latency_ms":12}}',
        b'{"experiment":"checkout","arm":"nope","ts":1700000000}',
        b'{"experiment":"checkout","arm":"treatment","ts":1600000000}',
        None,
    ]
    data = _batch(7, values)
    flushes = []
    for deserializer in (bare_records.bare_value, None):
        acc = PartitionAccumulator(contract, TP.topic, TP.partition)
        acc.fold(_records(data, 7, deserializer), now=now)
        flushes.append(acc.drain())
    bare, full = flushes
    assert bare.summaries == full.summaries
    assert bare.summarised == full.summarised == 1
    assert bare.deadlettered == full.deadlettered == {"unknown_arm": 1, "late": 1, "no_value": 1}
    assert [(d.reason, d.record.offset, d.record.value) for d in bare.deadletters] == [
        (d.reason, d.record.offset, d.record.value) for d in full.deadletters
    ]
