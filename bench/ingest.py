"""Ingest throughput on the real local broker, against a raw consume-and-decode baseline.

For each number of experiments (default 10, 1,000 and 10,000; 2 to 5 arms each, 3 metrics per
record, ~150-byte JSON records, experiments drawn uniformly: the worst case for per-group costs)
it produces N records to a fresh topic, then measures on that same topic, each in a fresh
subprocess so the peak RSS is the measurement's own:

(a) raw: a plain aiokafka ``getmany(max_records=100000)`` loop that only decodes with orjson;
(a') raw bare: the same loop on the record path ingest consumes (``daemon/bare_records.py``: the
    record parser's objects, no ``ConsumerRecord`` each), so the ingest stage's own cost can be
    read beside the issue's baseline (a), which builds a ``ConsumerRecord`` per record;
(b) ingest: :class:`armguard.daemon.ingest.IngestStage` with the default settings (contract
    checks, folding, summaries, dead letters, one transaction per flush with the offsets),
    timed from the end of its partition assignment (before it folds a record) to the commit of
    the last record.

Each is measured ``--repeat`` times, alternating, and the best of each is kept (the box is
shared); the process CPU time per event is printed too, as it is less disturbed by neighbours. It prints events per second of both, their ratio, the per-event cost of ingest and the peak RSS,
then how the per-event cost changes from the fewest to the most experiments, and the ingest's
peak RSS at N/4 and N records (memory should not depend on the number of events).

    .venv/bin/python bench/ingest.py                       # N = 400,000 (about 4 minutes)
    .venv/bin/python bench/ingest.py --records 100000 --experiments 10,10000   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from typing import Any

import numpy as np
import orjson

BOOTSTRAP = os.environ.get("ARMGUARD_TEST_BOOTSTRAP", "127.0.0.1:19092")
PARTITIONS = 2
NOW = time.time()


def experiments_config(n_experiments: int) -> dict[str, Any]:
    rng = np.random.default_rng(n_experiments)
    exps = []
    for i in range(n_experiments):
        n_arms = int(rng.integers(2, 6))
        arms = {"control": 1.0 / n_arms}
        for a in range(1, n_arms):
            arms[f"t{a}"] = 1.0 / n_arms
        # Allocations must sum to exactly 1 within 1e-6.
        arms["control"] = 1.0 - sum(v for k, v in arms.items() if k != "control")
        exps.append(
            {
                "id": f"exp-{i:05d}",
                "control": "control",
                "arms": arms,
                "metrics": {
                    "latency_ms": {"min": 0, "max": 600000},
                    "error": {"min": 0, "max": 1},
                    "revenue": {"min": 0, "max": 100000},
                },
            }
        )
    return {"experiments": exps}


def telemetry(n_records: int, n_experiments: int, seed: int = 1) -> list[bytes]:
    cfg = experiments_config(n_experiments)
    arms = [list(e["arms"]) for e in cfg["experiments"]]
    rng = np.random.default_rng(seed)
    exp = rng.integers(0, n_experiments, size=n_records)
    arm_draw = rng.random(n_records)
    latency = np.round(rng.gamma(2.0, 60.0, size=n_records), 2)
    error = (rng.random(n_records) < 0.02).astype(int)
    revenue = np.where(
        rng.random(n_records) < 0.1, np.round(rng.lognormal(3.0, 1.0, n_records), 2), 0.0
    )
    ts = NOW - rng.random(n_records) * 30.0
    out = []
    dumps = orjson.dumps
    for i in range(n_records):
        e = int(exp[i])
        a = arms[e][int(arm_draw[i] * len(arms[e]))]
        out.append(
            dumps(
                {
                    "experiment": f"exp-{e:05d}",
                    "arm": a,
                    "ts": float(ts[i]),
                    "unit": f"user-{int(rng.integers(1_000_000_000))}",
                    "metrics": {
                        "latency_ms": float(latency[i]),
                        "error": int(error[i]),
                        "revenue": float(revenue[i]),
                    },
                }
            )
        )
    return out


async def produce(topic: str, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP, linger_ms=50, max_batch_size=1 << 20, acks=1
    )
    await producer.start()
    try:
        futures = []
        for p in range(PARTITIONS):
            builder = producer.create_batch()
            for v in values[p::PARTITIONS]:
                if builder.append(key=None, value=v, timestamp=None) is None:
                    futures.append(await producer.send_batch(builder, topic, partition=p))
                    builder = producer.create_batch()
                    builder.append(key=None, value=v, timestamp=None)
            futures.append(await producer.send_batch(builder, topic, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def delete_topics(names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        gone = [n for n in names if n in existing]
        if gone:
            await admin.delete_topics(gone)
    finally:
        await admin.close()


# -- measurements (each in its own process) -------------------------------------------------------


async def measure_raw(topic: str, n_records: int, bare: bool = False) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from armguard.daemon import bare_records

    extra: dict[str, Any] = {}
    if bare:
        assert bare_records.enable(), "the bare-record path is not active"
        extra["value_deserializer"] = bare_records.bare_value
    consumer = AIOKafkaConsumer(
        bootstrap_servers=BOOTSTRAP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        **extra,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loads = orjson.loads
        seen = 0
        started = time.perf_counter()
        cpu_started = time.process_time()
        while seen < n_records:
            batches = await consumer.getmany(timeout_ms=500, max_records=100_000)
            for records in batches.values():
                for r in records:
                    loads(r.value)
                seen += len(records)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        await consumer.stop()
    return {"events": seen, "seconds": elapsed, "cpu_seconds": cpu}


async def measure_ingest(
    topic: str, n_experiments: int, n_records: int, max_pending: int | None = None
) -> dict[str, float]:
    from prometheus_client import CollectorRegistry

    from armguard.daemon.experiments import ExperimentsFile
    from armguard.daemon.health import Health
    from armguard.daemon.heap import prepare_heap
    from armguard.daemon.ingest import IngestStage
    from armguard.daemon.metrics import Metrics
    from armguard.daemon.settings import Settings

    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka={"bootstrap_servers": BOOTSTRAP},
        topics={
            "telemetry": [topic],
            "summaries": f"bench-summaries-{suffix}",
            "deadletter": f"bench-deadletter-{suffix}",
        },
        ingest={"group_id": f"bench-ingest-{suffix}"}
        | ({"max_pending_records": max_pending} if max_pending else {}),
    )
    from aiokafka.admin import AIOKafkaAdminClient

    from armguard.daemon.kafka import ensure_topics

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        out_topics = [settings.topics.summaries, settings.topics.deadletter]
        await ensure_topics(admin, settings, names=out_topics, partitions=PARTITIONS)
    finally:
        await admin.close()
    exps = ExperimentsFile.model_validate(experiments_config(n_experiments))
    health = Health()
    stage = IngestStage(settings, exps, Metrics(CollectorRegistry()), health)
    prepare_heap()  # as Daemon.run does before it starts the stages
    stop = asyncio.Event()
    marks: dict[str, float] = {}
    acquire = stage._acquire

    async def timed_acquire(tps: Any) -> None:
        # The clock starts when the stage owns its partitions, before it folds anything: the
        # first getmany returns records right after the assignment callback, and they are
        # folded before a poll of this loop could notice that the stage is ready.
        await acquire(tps)
        marks.setdefault("ready", time.perf_counter())
        marks.setdefault("cpu_ready", time.process_time())

    stage._acquire = timed_acquire  # type: ignore[method-assign]
    task = asyncio.create_task(stage.run(stop))
    try:
        # Poll in-process state: when every record is folded (then stop: the shutdown flush
        # commits the rest at once), when all are committed.
        while True:
            folded = stage.totals["consumed"] + sum(a.pending for a in stage._accs.values())
            if folded >= n_records and not stop.is_set():
                stop.set()
            if stage.totals["consumed"] >= n_records:
                marks["committed"] = time.perf_counter()
                marks["cpu_committed"] = time.process_time()
                break
            # Only now: after stop, the final flush may commit everything and end the stage
            # between two polls, which is the normal end, not an early stop.
            if task.done():
                task.result()
                raise RuntimeError("the stage stopped early")
            await asyncio.sleep(0.002)
        await task
    finally:
        stop.set()
        if not task.done():
            await task
        await delete_topics([settings.topics.summaries, settings.topics.deadletter])
    return {
        "events": stage.totals["consumed"],
        "seconds": marks["committed"] - marks["ready"],
        "cpu_seconds": marks["cpu_committed"] - marks["cpu_ready"],
        "transactions": stage.totals["transactions"],
        "summaries": stage.totals["summaries"],
        "summary_bytes": stage.totals["summary_bytes"],
    }


def _peak_rss_mb() -> float:
    # VmHWM, not getrusage: Linux carries ru_maxrss across execve, so a child spawned by this
    # (large) parent would report the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> None:
    if args.measure in ("raw", "raw-bare"):
        out = asyncio.run(measure_raw(args.topic, args.records, bare=args.measure == "raw-bare"))
    else:
        out = asyncio.run(
            measure_ingest(args.topic, args.n_experiments, args.records, args.max_pending)
        )
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out))


def _spawn(*extra: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"measurement failed: {' '.join(extra)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=400_000)
    p.add_argument("--experiments", default="10,1000,10000")
    p.add_argument("--repeat", type=int, default=3, help="measurements of each, best kept")
    p.add_argument("--measure", choices=["raw", "raw-bare", "ingest"], help=argparse.SUPPRESS)
    p.add_argument("--topic", help=argparse.SUPPRESS)
    p.add_argument("--n-experiments", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-pending", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        _child(args)
        return

    n = args.records
    counts = [int(x) for x in args.experiments.split(",")]
    rows = []
    topics = []
    try:
        for k in counts:
            topic = f"bench-telemetry-{k}-{uuid.uuid4().hex[:8]}"
            topics.append(topic)
            values = telemetry(n, k)
            size = sum(len(v) for v in values) / n
            asyncio.run(produce(topic, values))
            del values
            # Alternate the two, best of `--repeat` each: the box is shared and noisy.
            raws, bares, ings = [], [], []
            for _ in range(args.repeat):
                raws.append(_spawn("--measure", "raw", "--topic", topic, "--records", str(n)))
                bares.append(_spawn("--measure", "raw-bare", "--topic", topic, "--records", str(n)))
                ings.append(
                    _spawn(
                        "--measure",
                        "ingest",
                        "--topic",
                        topic,
                        "--records",
                        str(n),
                        "--n-experiments",
                        str(k),
                    )
                )
            raw = min(raws, key=lambda r: r["seconds"] / r["events"])
            bare = min(bares, key=lambda r: r["seconds"] / r["events"])
            ing = min(ings, key=lambda r: r["seconds"] / r["events"])
            rows.append((k, size, raw, bare, ing))
            r_rate = raw["events"] / raw["seconds"]
            b_rate = bare["events"] / bare["seconds"]
            i_rate = ing["events"] / ing["seconds"]
            print(
                f"{k:>6} experiments: raw {r_rate:>9,.0f} ev/s, raw bare {b_rate:>9,.0f} ev/s | "
                f"ingest {i_rate:>9,.0f} ev/s ({i_rate / r_rate:.0%} of raw, "
                f"{i_rate / b_rate:.0%} of raw bare, {1e6 / i_rate:.2f} us/event, "
                f"{ing['transactions']} transactions, {ing['summaries']} summaries of "
                f"{ing['summary_bytes'] / ing['events']:.0f} B/event) | "
                f"peak RSS raw {raw['peak_rss_mb']:.0f} MB, ingest {ing['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        # Memory against the number of events: the same topic, a quarter of the records and
        # all of them, with a flush bound below both (memory is bounded by the flush size).
        k = rows[0][0]
        bound = str(max(1000, n // 8))
        memory = [
            _spawn(
                "--measure",
                "ingest",
                "--topic",
                topics[0],
                "--records",
                str(m),
                "--n-experiments",
                str(k),
                "--max-pending",
                bound,
            )
            for m in (n // 4, n)
        ]
    finally:
        asyncio.run(delete_topics(topics))

    print()
    print(f"N = {n:,} records of ~{rows[0][1]:.0f} bytes, {PARTITIONS} partitions")
    print(
        "| experiments | raw getmany+orjson ev/s | raw bare ev/s | ingest ev/s | ingest/raw "
        "| ingest/raw bare | ingest us/event | CPU us/event raw / raw bare / ingest "
        "| summary bytes/event | ingest peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, _, raw, bare, ing in rows:
        r_rate = raw["events"] / raw["seconds"]
        b_rate = bare["events"] / bare["seconds"]
        i_rate = ing["events"] / ing["seconds"]
        print(
            f"| {k:,} | {r_rate:,.0f} | {b_rate:,.0f} | {i_rate:,.0f} | {i_rate / r_rate:.0%} | "
            f"{i_rate / b_rate:.0%} | {1e6 / i_rate:.2f} | "
            f"{1e6 * raw['cpu_seconds'] / raw['events']:.2f} / "
            f"{1e6 * bare['cpu_seconds'] / bare['events']:.2f} / "
            f"{1e6 * ing['cpu_seconds'] / ing['events']:.2f} | "
            f"{ing['summary_bytes'] / ing['events']:.0f} | "
            f"{ing['peak_rss_mb']:.0f} |"
        )
    costs = [ing["seconds"] / ing["events"] for *_, ing in rows]
    cpu = [ing["cpu_seconds"] / ing["events"] for *_, ing in rows]
    # The two counts are measured minutes apart and a shared box's speed drifts meanwhile (raw
    # moved by up to 30% between rows); each row's ingest cost over its own raw cost, measured
    # alternately with it, cancels that drift.
    relative = [
        (ing["seconds"] / ing["events"]) / (raw["seconds"] / raw["events"])
        for _, _, raw, _, ing in rows
    ]
    print(
        f"per-event cost, {rows[-1][0]:,} vs {rows[0][0]:,} experiments: "
        f"{costs[-1] / costs[0]:.2f}x wall, {cpu[-1] / cpu[0]:.2f}x CPU; "
        f"{relative[-1] / relative[0]:.2f}x with each in units of its own raw cost"
    )
    print(
        f"ingest peak RSS, {rows[0][0]:,} experiments, max_pending_records={max(1000, n // 8):,}: "
        f"{memory[0]['peak_rss_mb']:.0f} MB at {n // 4:,} records, "
        f"{memory[1]['peak_rss_mb']:.0f} MB at {n:,}"
    )


if __name__ == "__main__":
    main()
