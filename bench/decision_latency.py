"""Decision latency of the running daemon, and state restore time, on the local broker.

Part 1, decision latency. ``armguard run`` (ingest + evaluate, a subprocess, the settings printed)
consumes a telemetry topic that this script fills on a steady schedule (default 50,000 events/s,
record i due at i / rate; the simulator's generator; every ~10 ms what is due, one producer batch
per partition). Every ``--gap-s`` seconds a regression starts in ``treatment-a`` of the next
experiment (error rate 1% -> 10%, latency x 1.5); each makes one kill-switch event, read by a
``read_committed`` consumer in a thread of this process that notes when it became readable.

The *deciding record* of a kill event: its ``data.offsets.telemetry`` lists, per telemetry
partition, the offset range of the input the decision rests on; of the records at the ``last``
offsets of those ranges, the one this script produced latest. Its produce time is when the
producer batch carrying it was handed to ``send_batch`` (its broker ack, also printed, came
later). Decision latency = kill event readable - deciding record produced. By construction it
leaves out the wait for the flush (the deciding record is the last of a flushed summary), so the
script also prints the latency from the *first* record of the deciding summary (the summary at
the last offset of ``data.offsets.summaries``): the worst case, a tipping record that arrived
just after the previous flush. Both are compared with the target p99 < flush_interval_s +
evaluation_interval_s + 1 s. It also prints the achieved input rate, how far the producer fell
behind its schedule, the ingest group's lag (end - committed offsets, sampled every second) and
the CPU used, so a rate the box cannot sustain shows, rather than a silently lower rate.

Part 2, state restore. It writes realistic snapshots (an :class:`~armguard.daemon.engine.Engine`
fed six 5-second summaries per experiment, ending mid evaluation interval: 3 arms, 2 metrics and
a feature with full histograms, 3 guardrails and SRM; 32 distinct snapshots reused under each
experiment's id) for 1,000 and 10,000 experiments to a compacted state topic (the daemon's
topic configs, 6 partitions, committed in transactions), then times ``EvaluateStage._restore`` for every partition
(what the daemon runs on assignment before it reports ready), wall and CPU, split into
``Engine.restore`` (JSON parse + ``ExperimentState.restore``) and reading the topic, against the
target (under 5 s for 10,000).

Usage::

    .venv/bin/python bench/decision_latency.py                    # both parts, ~2 minutes
    .venv/bin/python bench/decision_latency.py --only decisions --rate 20000 --runs 4
    .venv/bin/python bench/decision_latency.py --only restore --experiments 1000,10000 --profile

Figures, never assertions: it prints and exits 0. Topics and groups have unique names; the
topics are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import cProfile
import io
import logging
import math
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from armguard.daemon.engine import Engine
from armguard.daemon.evaluate import EvaluateStage
from armguard.daemon.experiments import ExperimentsFile, parse_experiments
from armguard.daemon.health import Health
from armguard.daemon.kafka import ensure_topics, topic_partitions
from armguard.daemon.metrics import Metrics
from armguard.daemon.settings import Settings
from armguard.daemon.simulate import (
    Bernoulli,
    ExperimentSpec,
    LogNormal,
    Regression,
    Scenario,
    Simulation,
)
from armguard.detectors.summary import Summary

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = os.environ.get("ARMGUARD_TEST_BOOTSTRAP", "127.0.0.1:19092")
# Kafka record timestamps (CreateTime, wall clock) are put on the monotonic clock with this offset;
# on one machine over a few minutes the two clocks do not drift apart measurably.
WALL_MINUS_MONOTONIC = time.time() - time.monotonic()
QUIET = 1.0  # cores used by other work (half the box) below which a run counts as quiet
ARMS = {"control": 0.5, "treatment-a": 0.25, "treatment-b": 0.25}


def experiments_yaml(ids: list[str]) -> str:
    """The demo's experiment shape (config/demo.yaml) under each id, as YAML."""
    return yaml.safe_dump({"experiments": experiment_dicts(ids)}, sort_keys=False)


def experiments_file(ids: list[str]) -> ExperimentsFile:
    """The same, validated without the YAML round trip (PyYAML is slow for 10,000)."""
    return ExperimentsFile.model_validate({"experiments": experiment_dicts(ids)})


def experiment_dicts(ids: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "control": "control",
            "arms": ARMS,
            "alpha": 0.05,
            "metrics": {"latency_ms": {"min": 0, "max": 600000}, "error": {"min": 0, "max": 1}},
            "features": {"query_length": {"min": 0, "max": 10000}},
            "guardrails": [
                {
                    "metric": "error",
                    "test": "proportion",
                    "harmful": "increase",
                    "margin": 0,
                    "min_samples": 500,
                    "action": "kill",
                },
                {
                    "metric": "latency_ms",
                    "test": "mean",
                    "harmful": "increase",
                    "margin": "2%",
                    "min_samples": 500,
                    "action": "kill",
                },
                {
                    "metric": "query_length",
                    "source": "feature",
                    "test": "drift",
                    "action": "alert",
                    "consecutive": 3,
                },
            ],
            "srm": {"enabled": True, "alpha": 0.001, "action": "alert", "min_samples": 1000},
        }
        for i in ids
    ]


def _cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def pct(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default)."""
    return float(np.quantile(np.asarray(values, dtype=float), q))


# ------------------------------------------------------------------------------------------
# Part 1: decision latency
# ------------------------------------------------------------------------------------------


@dataclass
class Sent:
    """Produce times of the records of one partition, one entry per producer batch."""

    base: list[int] = field(default_factory=list)  # first offset of each acked batch
    count: list[int] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)  # time.monotonic() at send_batch
    acked: list[float] = field(default_factory=list)

    def times(self, offset: int) -> tuple[float, float] | None:
        """(sent, acked) of the record at ``offset`` of this partition."""
        j = bisect.bisect_right(self.base, offset) - 1
        if j < 0 or offset >= self.base[j] + self.count[j]:
            return None
        return self.sent[j], self.acked[j]


class KillReader(threading.Thread):
    """A read_committed consumer of the kill-switch topic on its own event loop and thread, so
    the producer's work does not delay when an event is seen."""

    def __init__(self, topic: str, daemon_pid: int):
        super().__init__(name="kill-reader", daemon=True)
        self.topic = topic
        # (monotonic when seen, Kafka timestamp in s on the monotonic clock, event)
        self.events: list[tuple[float, float, dict[str, Any]]] = []
        # (monotonic, CPU seconds used by the whole box minus the daemon and this script)
        self.others: list[tuple[float, float]] = []
        self.daemon_pid = daemon_pid
        self.ready = threading.Event()
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # re-raised by the main thread
            self.error = exc
            self.ready.set()

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=BOOTSTRAP,
            isolation_level="read_committed",
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        try:
            tps = [
                TopicPartition(self.topic, p) for p in await topic_partitions(consumer, self.topic)
            ]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self.ready.set()
            while not self.halt.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                seen = time.monotonic()
                self.others.append((seen, others_cpu_seconds(self.daemon_pid)))
                for records in batches.values():
                    for rec in records:
                        if rec.value is not None:
                            written = rec.timestamp / 1000 - WALL_MINUS_MONOTONIC
                            self.events.append((seen, written, orjson.loads(rec.value)))
        finally:
            await consumer.stop()


async def lag_sampler(group: str, topic: str, out: list[tuple[float, int]]) -> None:
    """Every second, the ingest group's lag: end offsets - committed offsets of ``topic``.

    The ingest commits once per flush, so a stage that keeps up shows at most about one flush
    interval of input here; a growing figure means the rate is not sustained."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    ends = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await admin.start()
    await ends.start()
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(ends, topic)]
        while True:
            committed = await admin.list_consumer_group_offsets(group)
            end = await ends.end_offsets(tps)
            lag = sum(
                end[tp] - max(0, committed[tp].offset) if tp in committed else end[tp] for tp in tps
            )
            out.append((time.monotonic(), lag))
            await asyncio.sleep(1.0)  # sampling period of an observable quantity
    finally:
        await ends.stop()
        await admin.close()


def others_cpu_seconds(daemon_pid: int) -> float:
    """CPU seconds used so far by the whole box minus the daemon and this process (Linux)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
    ticks = [int(x) for x in fields[:8]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    try:
        mine = cpu_seconds(daemon_pid)
    except OSError:
        mine = 0.0
    return busy - mine - cpu_seconds(os.getpid())


def cores_used(samples: list[tuple[float, float]], t_from: float, t_to: float) -> float | None:
    """Average cores used over [t_from, t_to] from cumulative (time, CPU seconds) samples."""
    if len(samples) < 2:
        return None
    times = [t for t, _ in samples]
    i = max(0, bisect.bisect_right(times, t_from) - 1)
    j = min(len(samples) - 1, bisect.bisect_left(times, t_to))
    if j <= i:
        return None
    (a, sa), (b, sb) = samples[i], samples[j]
    return max(0.0, (sb - sa) / (b - a))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Produced:
    """What the paced producer did."""

    records: int = 0
    seconds: float = 0.0
    max_behind_s: float = 0.0  # furthest the sends fell behind the schedule
    chunk_index: list[int] = field(default_factory=list)  # first record index of each send
    chunk_sent: list[float] = field(default_factory=list)

    def sent_at(self, index: int) -> float:
        """When record ``index`` of the stream was handed to the producer."""
        return self.chunk_sent[bisect.bisect_right(self.chunk_index, index) - 1]


async def produce_paced(
    sim: Simulation,
    topic: str,
    partitions: int,
    sent: dict[int, Sent],
    done: asyncio.Event,
) -> Produced:
    """Send ``sim`` on the schedule ``record i at i / rate``: every ~10 ms whatever is due, split
    in one producer batch per partition. A producer that fell behind (aiokafka queues one batch
    per partition while the previous is in flight) sends more at once and catches up, so the
    average rate holds; how far it fell behind is reported."""
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=0, max_batch_size=1 << 20
    )
    await producer.start()
    out = Produced()
    rate = sim.rate
    pending: list[asyncio.Future[Any]] = []

    def on_ack(p: int, size: int, t_sent: float, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        s = sent[p]
        s.base.append(fut.result().offset)
        s.count.append(size)
        s.sent.append(t_sent)
        s.acked.append(time.monotonic())

    origin = time.monotonic()
    try:
        for batch in sim.batches():
            pos = 0
            while pos < len(batch):
                if done.is_set():
                    return out
                now = time.monotonic()
                due = math.floor((now - origin) * rate) + 1  # records due by now
                first = batch.first + pos
                if first >= due:
                    await asyncio.sleep(max(0.01, (first + 1 - due) / rate))  # the schedule
                    continue
                out.max_behind_s = max(out.max_behind_s, now - (origin + first / rate))
                # At most ~5,000 records (~800 KB) per partition batch: the broker's default
                # message.max.bytes is 1 MB.
                end = min(len(batch), pos + max(1, due - first), pos + 5000 * partitions)
                values = batch.values[pos:end]
                out.chunk_index.append(first)
                out.chunk_sent.append(now)
                step = math.ceil(len(values) / partitions)
                for p in range(partitions):
                    part = values[p * step : (p + 1) * step]
                    if not part:
                        continue
                    builder = producer.create_batch()
                    for v in part:
                        if builder.append(key=None, value=v, timestamp=None) is None:
                            raise ValueError("raise max_batch_size: a chunk does not fit")
                    k = len(part)
                    t_sent = time.monotonic()
                    fut = await producer.send_batch(builder, topic, partition=p)
                    # Batches of one partition are acked in order, so ``base`` stays sorted.
                    fut.add_done_callback(lambda f, p=p, k=k, t=t_sent: on_ack(p, k, t, f))
                    pending.append(fut)
                out.records += len(values)
                pos = end
            pending = [f for f in pending if not f.done()]
        return out
    finally:
        out.seconds = time.monotonic() - origin
        await asyncio.gather(*pending, return_exceptions=True)
        await producer.stop()


async def wait_for_leaders(admin: AIOKafkaAdminClient, topic: str) -> None:
    """Until every partition of a new topic has a leader (no NotLeader retries when producing)."""
    for _ in range(100):
        described = await admin.describe_topics([topic])
        parts = described[0].get("partitions") or []
        if parts and all(p.get("leader", -1) >= 0 for p in parts):
            return
        await asyncio.sleep(0.1)  # polling an observable condition


async def read_record(topic: str, partition: int, offset: int) -> tuple[dict[str, Any], float]:
    """A committed record's JSON value and its Kafka timestamp on the monotonic clock."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=BOOTSTRAP, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        while True:
            for rec in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if rec.offset == offset:
                    return orjson.loads(rec.value), rec.timestamp / 1000 - WALL_MINUS_MONOTONIC
    finally:
        await consumer.stop()


async def delete_topics(prefix_suffix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        gone = [t for t in await admin.list_topics() if t.endswith(prefix_suffix)]
        if gone:
            await admin.delete_topics(gone)
    finally:
        await admin.close()


async def decision_latency(args: argparse.Namespace) -> dict[str, Any]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.support.daemon import DaemonProcess, topic_env

    suffix = f"bench-lat-{uuid.uuid4().hex[:8]}"
    env = topic_env(suffix, partitions=args.partitions)
    telemetry = f"telemetry-{suffix}"
    env.update(
        {
            "ARMGUARD_INGEST__FLUSH_INTERVAL_S": str(args.flush_interval_s),
            "ARMGUARD_EVALUATE__EVALUATION_INTERVAL_S": str(args.evaluation_interval_s),
            "ARMGUARD_INGEST__POLL_TIMEOUT_MS": "200",
            "ARMGUARD_EVALUATE__POLL_TIMEOUT_MS": "200",
            "ARMGUARD_LOG_LEVEL": "WARNING",
        }
    )
    ids = [f"lat-{i}" for i in range(args.runs)]
    tmp = Path(tempfile.mkdtemp(prefix="armguard-bench-"))
    exp_path = tmp / "experiments.yaml"
    exp_path.write_text(experiments_yaml(ids))
    experiments = parse_experiments(exp_path.read_text(), where=str(exp_path))

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(telemetry, args.partitions, 1)])
        await wait_for_leaders(admin, telemetry)
    finally:
        await admin.close()

    at = [args.warmup_s + i * args.gap_s for i in range(args.runs)]
    scenario = Scenario(
        seed=1,
        rate=args.rate,
        duration_s=args.warmup_s + args.runs * args.gap_s,
        units=200_000,
        block_records=8192,
        experiments=[
            ExperimentSpec(
                id=i,
                metrics={
                    "latency_ms": LogNormal(median=120, sigma=0.4),
                    "error": Bernoulli(p=0.01),
                },
                features={"query_length": LogNormal(median=20, sigma=0.5, decimals=0)},
            )
            for i in ids
        ],
        inject=[
            r
            for i, a in zip(ids, at, strict=True)
            for r in (
                Regression(experiment=i, arm="treatment-a", metric="error", at_s=a, p=0.1),
                Regression(
                    experiment=i, arm="treatment-a", metric="latency_ms", at_s=a, relative=0.5
                ),
            )
        ],
    )
    log = tmp / "daemon.log"
    daemon = DaemonProcess(BOOTSTRAP, exp_path, env, log).start()
    print(
        f"daemon: ingest flush_interval_s={args.flush_interval_s}, evaluate "
        f"evaluation_interval_s={args.evaluation_interval_s}, poll_timeout_ms=200 (both), "
        f"{args.partitions} partitions per topic; {args.runs} experiments (3 arms, the demo's "
        f"guardrails); input {args.rate:,.0f} events/s for up to "
        f"{scenario.duration_s:.0f} s, regression at {', '.join(f'{a:g}' for a in at)} s"
    )
    sent = {p: Sent() for p in range(args.partitions)}
    lags: list[tuple[float, int]] = []
    reader: KillReader | None = None
    sampler: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(daemon.wait_ready, 120)
        reader = KillReader(env["ARMGUARD_TOPICS__KILLSWITCH"], daemon.proc.pid)
        reader.start()
        await asyncio.to_thread(reader.ready.wait, 60)
        if reader.error is not None:
            raise reader.error
        sampler = asyncio.create_task(
            lag_sampler(env["ARMGUARD_INGEST__GROUP_ID"], telemetry, lags)
        )
        cpu0, own0 = cpu_seconds(daemon.proc.pid), time.process_time()
        sim = Simulation(scenario, experiments, start_ts=round(time.time(), 3))
        done = asyncio.Event()

        async def all_killed() -> None:
            # Stop the input a few seconds after the last expected kill is seen.
            while len({e["subject"] for _, _, e in reader.events}) < args.runs:
                if not daemon.alive():
                    raise RuntimeError(f"daemon exited:\n{log.read_text()[-3000:]}")
                await asyncio.sleep(0.2)  # polling an observable condition
            await asyncio.sleep(3.0)
            done.set()

        watcher = asyncio.create_task(all_killed())
        t0 = time.monotonic()
        produced = await produce_paced(sim, telemetry, args.partitions, sent, done)
        if not done.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(watcher), 30)
            except TimeoutError:
                pass
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        wall = time.monotonic() - t0
        daemon_cores = (cpu_seconds(daemon.proc.pid) - cpu0) / wall
        own_cores = (time.process_time() - own0) / wall
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        if reader is not None:
            reader.halt.set()
            await asyncio.to_thread(reader.join, 10)
        code = await asyncio.to_thread(daemon.stop, 60)

    # -- analysis ------------------------------------------------------------------------
    n, seconds = produced.records, produced.seconds
    print(
        f"input: {n:,} events in {seconds:.1f} s = {n / seconds:,.0f} events/s achieved "
        f"(target {args.rate:,.0f}); the producer fell at most {produced.max_behind_s:.2f} s "
        "behind its schedule"
    )
    lag_values = [v for t, v in lags if t >= t0 + 5]
    if lag_values:
        print(
            f"ingest lag behind the input (end - committed offsets, sampled every 1 s after the "
            f"first 5 s): median {statistics.median(lag_values):,.0f} records "
            f"({statistics.median(lag_values) / args.rate:.2f} s of input), max "
            f"{max(lag_values):,.0f} ({max(lag_values) / args.rate:.2f} s), last "
            f"{lag_values[-1]:,.0f}"
        )
    print(
        f"CPU: daemon {daemon_cores:.2f} cores, this script (generator, producer, reader) "
        f"{own_cores:.2f} cores; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"daemon exit code {code}; log {log}")
    kills = [
        (seen, written, ev)
        for seen, written, ev in reader.events
        if ev["data"]["cause"] == "guardrail" and ev["data"]["arms"].get("treatment-a") == "killed"
    ]
    others = [
        ev
        for _, _, ev in reader.events
        if ev["data"]["arms"].get("treatment-b") != "running" or ev["data"]["state"] != "running"
    ]
    first: dict[str, tuple[float, float, dict[str, Any]]] = {}
    for seen, written, ev in kills:
        first.setdefault(ev["subject"], (seen, written, ev))
    rows = []
    summaries_topic = env["ARMGUARD_TOPICS__SUMMARIES"]
    for i, exp in enumerate(ids):
        if exp not in first:
            print(f"{exp}: no kill event (regression at {at[i]:g} s)")
            continue
        seen, kill_written, ev = first[exp]
        data = ev["data"]
        deciding = None
        for r in data["offsets"]["telemetry"]:
            times = sent[r["partition"]].times(r["last"])
            if times is not None and (deciding is None or times[0] > deciding[0]):
                deciding = (*times, r["partition"], r["last"])
        s_range = data["offsets"]["summaries"][-1]
        summary, summary_written = await read_record(
            summaries_topic, s_range["partition"], s_range["last"]
        )
        src = summary["offsets"][0]
        first_times = sent[src["partition"]].times(src["first"])
        if deciding is None or first_times is None:
            print(f"{exp}: produce time of the deciding record unknown")
            continue
        injected = produced.sent_at(round(at[i] * args.rate))  # first regressed record
        rows.append(
            {
                "exp": exp,
                "guardrail": data["decision"]["guardrail"],
                "from_last_sent": seen - deciding[0],
                "from_last_acked": seen - deciding[1],
                "from_first": seen - first_times[0],
                "from_injection": seen - injected,
                "ingest": summary_written - deciding[0],
                "evaluate": kill_written - summary_written,
                "readable": seen - kill_written,
                "others": cores_used(reader.others, deciding[0] - 1.0, seen),
                "records": src["last"] - src["first"] + 1,
            }
        )
    target = args.flush_interval_s + args.evaluation_interval_s + 1.0
    print()
    print(
        "Seconds. Deciding record sent -> kill event readable, split at the Kafka timestamps of "
        "the deciding summary (ingest's send) and of the kill event (evaluate's send)."
    )
    print(
        "| run | guardrail | from deciding record (send) | = ingest | + evaluate | + commit, "
        "read | from its ack | from first record of deciding summary | from injection | "
        "other work, cores |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['exp']} | {r['guardrail']} | {r['from_last_sent']:.3f} | {r['ingest']:.3f} | "
            f"{r['evaluate']:.3f} | {r['readable']:.3f} | {r['from_last_acked']:.3f} | "
            f"{r['from_first']:.3f} | {r['from_injection']:.2f} | {_cores(r['others'])} |"
        )
    print(
        "other work: CPU used on the box by everything but the daemon and this script (the "
        "broker and other people's jobs), from 1 s before the deciding record to the kill event; "
        f"the box has {os.cpu_count()} cores."
    )
    result: dict[str, Any] = {"rows": rows, "target": target, "other_events": len(others)}
    quiet = [r for r in rows if r["others"] is not None and r["others"] < QUIET]
    for subset, label in ((rows, "all runs"), (quiet, f"runs with other work < {QUIET} cores")):
        if not subset or (subset is quiet and len(quiet) == len(rows)):
            continue
        print(f"\n{label}:")
        for key, name in (
            ("from_last_sent", "deciding record produced -> kill event readable"),
            ("from_first", "first record of the deciding summary -> kill event readable"),
        ):
            v = [r[key] for r in subset]
            print(
                f"  {name}: p50 {pct(v, 0.5):.3f} s, p99 {pct(v, 0.99):.3f} s, max "
                f"{max(v):.3f} s over {len(v)} runs; target p99 < {target:g} s (flush "
                f"{args.flush_interval_s:g} + evaluation {args.evaluation_interval_s:g} + 1): "
                f"{'met' if pct(v, 0.99) < target else 'NOT met'}, ratio p99/target "
                f"{pct(v, 0.99) / target:.2f}"
            )
    print(f"kill-switch events for healthy arms or whole experiments: {len(others)}")
    await delete_topics(suffix)
    return result


# ------------------------------------------------------------------------------------------
# Part 2: state restore
# ------------------------------------------------------------------------------------------


def _arm_states(rng: np.random.Generator, n: int, t0: float) -> dict[str, Any]:
    out = {}
    for arm in ARMS:
        k = max(1, int(n * ARMS[arm] / 0.5))
        states = {}
        for name, values in (
            ("latency_ms", np.round(rng.lognormal(math.log(120), 0.4, k), 3)),
            ("error", (rng.random(k) < 0.01).astype(float)),
        ):
            s = Summary()
            s.update_many(values)
            states[name] = s.to_state()
        q = Summary()
        q.update_many(np.round(rng.lognormal(math.log(20), 0.5, k)))
        out[arm] = {"count": k, "metrics": states, "features": {"query_length": q.to_state()}}
    return out


def snapshot_variants(count: int, summaries: int, per_summary: int) -> list[dict[str, Any]]:
    """Snapshots of ``count`` experiments after ``summaries`` realistic summaries each."""
    ids = [f"variant-{i}" for i in range(count)]
    engine = Engine(experiments_file(ids))
    rng = np.random.default_rng(7)
    t0 = 1_764_300_000.0
    offset = 0
    for s in range(summaries):
        for exp in ids:
            rec = {
                "v": 1,
                "experiment": exp,
                "config_version": engine.version,
                "source": {"topic": "telemetry", "partition": 0},
                "offsets": [
                    {
                        "topic": "telemetry",
                        "partition": 0,
                        "first": offset,
                        "last": offset + per_summary - 1,
                    }
                ],
                "span": {"min_ts": t0 + 5 * s, "max_ts": t0 + 5 * s + 4.9},
                "arms": _arm_states(rng, per_summary // 2, t0),
            }
            offset += per_summary
            engine.apply_summary(orjson.dumps(rec), topic="summaries", partition=0, offset=s)
    return [engine.states[e].snapshot(engine.version) for e in ids]


async def write_state(
    settings: Settings, experiments: ExperimentsFile, variants: list[dict[str, Any]]
) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await ensure_topics(
            admin, settings, names=[settings.topics.state], partitions=settings.topics.partitions
        )
        await wait_for_leaders(admin, settings.topics.state)
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP,
        transactional_id=f"bench-restore-{uuid.uuid4().hex[:8]}",
        linger_ms=20,
        max_batch_size=1 << 20,
        max_request_size=4 << 20,
    )
    await producer.start()
    total = 0
    try:
        # Committed in transactions, as the evaluate stage writes them (read_committed restore).
        exps = experiments.experiments
        for start in range(0, len(exps), 1000):
            async with producer.transaction():
                for j, exp in enumerate(exps[start : start + 1000], start):
                    snap = dict(variants[j % len(variants)])
                    snap["experiment"] = exp.id
                    value = orjson.dumps(snap)
                    total += len(value)
                    await producer.send(settings.topics.state, value, key=exp.id.encode())
    finally:
        await producer.stop()
    return total


async def restore_time(n: int, variants: list[dict[str, Any]], profile: bool) -> dict[str, Any]:
    suffix = f"bench-restore-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka={"bootstrap_servers": BOOTSTRAP},
        topics={"state": f"state-{suffix}", "partitions": 6},
        evaluate={"group_id": f"evaluate-{suffix}"},
    )
    experiments = experiments_file([f"exp-{i:05d}" for i in range(n)])
    size = await write_state(settings, experiments, variants)
    stage = EvaluateStage(settings, experiments, Metrics(CollectorRegistry()), Health())
    per_partition = []
    profiler = cProfile.Profile() if profile else None
    started, cpu = time.perf_counter(), time.process_time()
    for p in range(settings.topics.partitions):
        t = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        await stage._restore(p)
        if profiler is not None:
            profiler.disable()
        per_partition.append(time.perf_counter() - t)
    # Ready: every partition's state topic read and its snapshots stashed.
    total = time.perf_counter() - started
    cpu = time.process_time() - cpu
    restored = len(stage.engine.experiment_ids())
    # Then the decoding the stage does on first use or in idle time, all of it at once here,
    # split into the JSON parse and ExperimentState.restore.
    pending = dict(stage.engine.pending)
    t = time.perf_counter()
    for value in pending.values():
        orjson.loads(value)
    parse = time.perf_counter() - t
    t = time.perf_counter()
    stage.engine.restore_pending(len(pending))
    decode = time.perf_counter() - t
    decoded = len(stage.engine.states)
    await delete_topics(suffix)
    out = {
        "experiments": n,
        "restored": restored,
        "decoded": decoded,
        "bytes": size,
        "seconds": total,
        "cpu_seconds": cpu,
        "engine_seconds": decode,
        "parse_seconds": parse,
        "max_partition_seconds": max(per_partition),
    }
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(14)
        out["profile"] = buf.getvalue()
    return out


async def state_restore(args: argparse.Namespace) -> list[dict[str, Any]]:
    t = time.perf_counter()
    # Six 5-second summaries end mid-way through a 10-second evaluation interval, so the
    # snapshots carry the open interval's data too (five would end just after a boundary).
    variants = snapshot_variants(32, summaries=6, per_summary=4000)
    sizes = [len(orjson.dumps(v)) for v in variants]
    print(
        f"snapshots: {len(variants)} distinct, built by the Engine from 6 summaries (5 s each) "
        "of 4,000 records each, mid evaluation interval (3 arms, 2 metrics + 1 feature, "
        "3 guardrails + SRM), "
        f"{statistics.mean(sizes) / 1024:.1f} KiB on average ({time.perf_counter() - t:.1f} s)"
    )
    results = []
    print(
        "| experiments | state topic MiB | ready s (6 partitions, sequential) | CPU s | "
        "slowest partition s | snapshots/s | target | decode all later s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.experiments:
        r = await restore_time(n, variants, args.profile)
        results.append(r)
        verdict = ""
        if n == 10_000:
            verdict = "met (< 5 s)" if r["seconds"] < 5 else "NOT met (< 5 s)"
        print(
            f"| {n:,} | {r['bytes'] / 2**20:.0f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
            f"{r['max_partition_seconds']:.2f} | {r['restored'] / r['seconds']:,.0f} | {verdict} | "
            f"{r['engine_seconds']:.2f} |"
        )
        if r["restored"] != n or r["decoded"] != n:
            print(f"  restored {r['restored']} and decoded {r['decoded']} of {n} experiments")
    for r in results:
        print(
            f"{r['experiments']:,}: ready after {r['seconds']:.2f} s of reading the topic (snapshots "
            f"stashed as bytes); decoding them all, which the stage does on first use or "
            f"200 at a time when idle, takes {r['engine_seconds']:.2f} s = JSON parse "
            f"~{r['parse_seconds']:.2f} s + ~{r['engine_seconds'] - r['parse_seconds']:.2f} s "
            "ExperimentState.restore"
        )
    for r in results:
        if "profile" in r:
            print(f"\nprofile of the restore of {r['experiments']:,} experiments (tottime):")
            print(r["profile"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("decisions", "restore"))
    parser.add_argument("--rate", type=float, default=50_000, help="input events per second")
    parser.add_argument("--runs", type=int, default=10, help="regressions (one per experiment)")
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--gap-s", type=float, default=10.0, help="seconds between regressions")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--flush-interval-s", type=float, default=1.0)
    parser.add_argument("--evaluation-interval-s", type=float, default=1.0)
    parser.add_argument(
        "--experiments",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 10_000],
        help="experiment counts of the restore measurement (comma-separated)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the restore")
    args = parser.parse_args()
    # A new topic's first produce requests may meet NotLeaderForPartition and are retried; the
    # sender's warnings about it would bury the figures.
    logging.getLogger("aiokafka.producer.sender").setLevel(logging.ERROR)
    print(f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.only in (None, "decisions"):
        print("\n## Decision latency")
        asyncio.run(decision_latency(args))
    if args.only in (None, "restore"):
        print("\n## State restore")
        asyncio.run(state_restore(args))


if __name__ == "__main__":
    main()
