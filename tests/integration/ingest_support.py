"""Helpers of the ingest integration tests: settings, telemetry (plain or in transactions),
reading topics, waiting on offsets."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from armguard.daemon.contract import Contract, PartitionAccumulator
from armguard.daemon.experiments import ExperimentsFile, parse_experiments
from armguard.daemon.settings import Settings
from armguard.daemon.summary_record import arm_states
from armguard.detectors.summary import Summary

EXPERIMENTS_YAML = """
experiments:
  - id: ranker-v2
    control: control
    arms: {control: 0.5, treatment: 0.5}
    metrics:
      latency_ms: {min: 0, max: 600000}
      error: {min: 0, max: 1}
    features:
      query_length: {min: 0, max: 10000}
  - id: checkout
    control: baseline
    arms: {baseline: 0.4, arm-a: 0.3, arm-b: 0.3}
    metrics:
      revenue: {min: 0, max: 100000}
"""


def experiments() -> ExperimentsFile:
    return parse_experiments(EXPERIMENTS_YAML, where="test.yaml")


def good_records(n: int, now: float, *, seed: int = 0) -> list[bytes]:
    """Valid telemetry; values are integers or halves, so sums are exact in any order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 3:
            arm = "control" if rng.random() < 0.5 else "treatment"
            rec = {
                "experiment": "ranker-v2",
                "arm": arm,
                "ts": now - float(rng.integers(0, 60)),
                "unit": f"u{i}",
                "metrics": {
                    "latency_ms": float(rng.integers(1, 4000)) / 2,
                    "error": int(rng.random() < 0.05),
                    "not_summarised": 7,
                },
                "features": {"query_length": int(rng.integers(0, 200))},
            }
        else:
            rec = {
                "experiment": "checkout",
                "arm": ["baseline", "arm-a", "arm-b"][int(rng.integers(0, 3))],
                "ts": now - float(rng.integers(0, 60)),
                "unit": int(i),
                "metrics": {"revenue": float(rng.integers(0, 20000)) / 2},
            }
        out.append(orjson.dumps(rec))
    return out


def bad_records(now: float) -> dict[str, list[bytes | None]]:
    """One or more records per dead-letter reason (10 MB one included) and skipped ones."""
    ok = {"experiment": "ranker-v2", "arm": "control", "ts": now, "metrics": {"latency_ms": 3}}

    def but(**kw: Any) -> bytes:
        return orjson.dumps({**ok, **kw})

    big = b'{"experiment": "ranker-v2", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    return {
        "invalid_json": [b"\xff\xfe\x00garbage", b'{"experiment": NaN}', b"{", b'"\xed\xa0\x80"'],
        "not_object": [b"[1, 2, 3]", b"42", b"null"],
        "no_value": [None],
        "too_large": [big],
        "missing_field": [orjson.dumps({"experiment": "ranker-v2", "ts": now})],
        "wrong_type": [
            but(experiment=["ranker-v2"]),
            but(arm=7),
            but(ts="yesterday"),
            but(metrics=[1, 2]),
            but(metrics={"latency_ms": "slow"}),
            but(metrics={"latency_ms": True}),
        ],
        "unknown_arm": [but(arm="treatment-b")],
        "late": [but(ts=now - 10 * 86_400)],
        "future": [but(ts=now + 3_600)],
        "out_of_range": [
            but(metrics={"latency_ms": -1}),
            but(metrics={"latency_ms": 3, "error": 2}),
            but(features={"query_length": 1e9}),
        ],
        "skipped": [orjson.dumps({"experiment": "someone-elses", "arm": "x", "ts": now})] * 5,
    }


async def produce(
    bootstrap: str,
    topic: str,
    values: list[bytes | None],
    *,
    partitions: int = 1,
    max_request_size: int = 1_048_576,
) -> None:
    """Produce round-robin over the partitions, in order, idempotently."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        max_request_size=max_request_size,
        linger_ms=20,
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic, v, key=None if v is not None else b"tombstone", partition=i % partitions
            )
            for i, v in enumerate(values)
        ]
        await producer.flush()
        for f in futures:
            await f
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record a read_committed consumer sees, all partitions, up to the stable end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                batch = await consumer.getmany(tp, timeout_ms=500)
                out.extend(batch.get(tp, []))
        return out
    finally:
        await consumer.stop()


async def wait_for(
    predicate: Callable[[], Any], what: str, *, timeout_s: float = 60.0, every_s: float = 0.1
) -> Any:
    """Poll an async or sync predicate until it returns a truthy value, or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(every_s)  # a polling interval, not synchronisation


async def committed(admin: Any, group: str, topic: str, partitions: int) -> dict[int, int]:
    offsets = await admin.list_consumer_group_offsets(group)
    return {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == topic and tp.partition < partitions
    }


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        end = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in end.items()}
    finally:
        await consumer.stop()


def merge_summaries(values: list[bytes]) -> dict[tuple[str, str], dict[str, Any]]:
    """Merge summary records into per (experiment, arm) counts and metric/feature summaries."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for raw in values:
        rec = orjson.loads(raw)
        for arm, body in arm_states(rec).items():
            m = merged.setdefault(
                (rec["experiment"], arm), {"count": 0, "metrics": {}, "features": {}}
            )
            m["count"] += body["count"]
            for section in ("metrics", "features"):
                for name, state in body[section].items():
                    s = Summary.from_state(state)
                    if name in m[section]:
                        m[section][name].merge_in(s)
                    else:
                        m[section][name] = s
    return merged


def reference(
    contract: Contract, topic: str, records_by_partition: dict[int, list[Any]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """What an uninterrupted run yields: every record of each partition folded in one go."""
    values = []
    for p, recs in records_by_partition.items():
        acc = PartitionAccumulator(contract, topic, p)
        acc.fold(recs)
        flush = acc.drain()
        if flush is not None:
            values.extend(v for _, v in flush.summaries)
    return merge_summaries(values)


def assert_same_summaries(got: dict[Any, Any], want: dict[Any, Any]) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g["count"] == w["count"], key
        for section in ("metrics", "features"):
            assert set(g[section]) == set(w[section]), (key, section)
            for name, ws in w[section].items():
                gs = g[section][name]
                assert gs.count == ws.count and gs.sum == ws.sum, (key, name)
                assert gs.min == ws.min and gs.max == ws.max, (key, name)
                assert gs.histogram == ws.histogram, (key, name)
                assert abs(gs.mean - ws.mean) <= 1e-9 * max(1.0, abs(ws.mean)), (key, name)
                assert abs(gs.m2 - ws.m2) <= 1e-7 * max(1.0, abs(ws.m2)), (key, name)


def assert_offsets_tile(
    summary_values: list[bytes], ends: dict[int, int], topic: str, *, contiguous: bool = False
) -> None:
    """The offset ranges of the summaries never overlap (no record counted twice); with
    ``contiguous`` they cover every offset from 0 to the end (no record lost)."""
    ranges: dict[int, set[tuple[int, int]]] = {}
    for raw in summary_values:
        rec = orjson.loads(raw)
        for o in rec["offsets"]:
            assert o["topic"] == topic
            ranges.setdefault(o["partition"], set()).add((o["first"], o["last"]))
    for p, rs in ranges.items():
        ordered = sorted(rs)
        for (_, last), (first, _) in itertools.pairwise(ordered):
            assert first > last, f"partition {p}: overlapping flushes {ordered}"
            if contiguous:
                assert first == last + 1, f"partition {p}: gap between {last} and {first}"
        assert ordered[-1][1] < ends[p]
        if contiguous:
            assert ordered[0][0] == 0 and ordered[-1][1] == ends[p] - 1, (p, ordered)
    if contiguous:
        assert set(ranges) == {p for p, e in ends.items() if e}


def ingest_settings(
    bootstrap: str, topic: str, summaries: str, deadletter: str, group: str, **ingest: Any
) -> Settings:
    """Settings of an ingest-only daemon on one telemetry topic, flushing every 0.3 s."""
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "session_timeout_ms": 6000},
        topics={"telemetry": [topic], "summaries": summaries, "deadletter": deadletter},
        ingest={"group_id": group, "flush_interval_s": 0.3, **ingest},
        evaluate={"enabled": False},
    )


async def caught_up(
    admin: Any, group: str, topic: str, ends: dict[int, int], *tasks: asyncio.Task[Any]
) -> bool:
    """Whether the group's committed offsets are ``ends``; raises the failure of any of the
    stage ``tasks`` instead of letting the caller time out."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            task.result()
    return await committed(admin, group, topic, len(ends)) == ends


async def produce_transactions(
    bootstrap: str,
    topic: str,
    writer: str,
    plan: list[tuple[list[bytes], bool, list[int]]],
) -> int:
    """Write each (values, commit, partitions) as one transaction of the transactional id
    ``writer``, the values round-robin over its partitions, committed or aborted; return how
    many committed records were written."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=writer)
    await producer.start()
    written = 0
    try:
        for values, commit, partitions in plan:
            await producer.begin_transaction()
            for i, v in enumerate(values):
                await producer.send(topic, v, partition=partitions[i % len(partitions)])
            if commit:
                await producer.commit_transaction()
                written += len(values)
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()
    return written
