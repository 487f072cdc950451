"""Where simulated telemetry goes: a JSON-lines file (or stdout), or a Kafka topic.

The generator (:mod:`armguard.daemon.simulate`) is pure; this module is its edge. Output is
either as fast as possible or paced against the event-time clock by a :class:`Pacer`: record
``i`` is due ``i / rate`` seconds after the first, the loop sleeps at most ``max_sleep_s`` at a
time (so a stop request is seen promptly) and, when it falls more than ``max_lag_s`` behind, it
gives up the debt instead of bursting to catch up (the report counts those rebases).

Kafka output builds one producer batch per partition and chunk (``send_batch``), keyed by unit
or experiment with the Java client's murmur2 partitioner, so keyed records land where a keyed
``send`` would put them; partitions of units are computed once per unit and cached. At most two
blocks are in flight: the futures of one block are awaited before the next is sent.

Examples
--------
>>> p = Pacer(rate=100.0)
>>> p.delay(0, now=10.0), p.delay(50, now=10.1), p.delay(50, now=10.6)
(0.0, 0.25, 0.0)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np

from .partitioner import murmur2_many, partitions_of
from .simulate import Batch, Simulation

__all__ = [
    "Pacer",
    "SinkReport",
    "add_parser",
    "kafka_partition",
    "murmur2_many",
    "produce",
    "run_cli",
    "write_jsonl",
]

KeyBy = Literal["unit", "experiment", "none"]


class Pacer:
    """Deadlines of records on the wall clock, for a steady ``rate`` of events per second.

    Parameters
    ----------
    rate
        Events per second.
    max_sleep_s
        Longest single sleep :meth:`delay` asks for.
    max_lag_s
        When the sender is further behind than this, the schedule moves forward (``rebases``)
        rather than sending a burst to catch up.
    chunk_s
        Event time covered by one paced send: the granularity of the pacing.
    """

    def __init__(
        self,
        rate: float,
        *,
        max_sleep_s: float = 0.25,
        max_lag_s: float = 1.0,
        chunk_s: float = 0.02,
    ):
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of events per second, got {rate}")
        self.rate = rate
        self.max_sleep_s = max_sleep_s
        self.max_lag_s = max_lag_s
        self.chunk_s = chunk_s
        self.rebases = 0
        self.max_lag_seen_s = 0.0
        self._origin: float | None = None

    def delay(self, index: int, now: float) -> float:
        """Seconds to wait before sending record ``index`` (0.0 when it is due)."""
        if self._origin is None:
            self._origin = now - index / self.rate
        lag = now - (self._origin + index / self.rate)
        if lag >= 0:
            if lag > self.max_lag_s:
                self._origin += lag
                self.rebases += 1
            else:
                self.max_lag_seen_s = max(self.max_lag_seen_s, lag)
            return 0.0
        return min(-lag, self.max_sleep_s)

    def chunk_records(self) -> int:
        """Records per paced send: ``chunk_s`` worth (20 ms by default)."""
        return max(1, math.ceil(self.rate * self.chunk_s))


@dataclass
class SinkReport:
    """What a sink wrote."""

    records: int = 0
    bad: int = 0
    seconds: float = 0.0
    first_ts: float | None = None
    last_ts: float | None = None
    paced: bool = False
    rebases: int = 0
    max_lag_s: float = 0.0

    def add(self, batch: Batch, start: int, end: int) -> None:
        self.records += end - start
        self.bad += int((batch.bad[start:end] >= 0).sum())
        if end > start:
            if self.first_ts is None:
                self.first_ts = float(batch.ts[start])
            self.last_ts = float(batch.ts[end - 1])

    def line(self, where: str) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        span = (
            f", event time {self.first_ts:.3f}..{self.last_ts:.3f}"
            if self.first_ts is not None and self.last_ts is not None
            else ""
        )
        pacing = f", paced: max lag {self.max_lag_s:.3f} s" if self.paced else ""
        if self.rebases:
            pacing += f", {self.rebases} rebase(s) after falling behind"
        return (
            f"simulate: {self.records} records ({self.bad} bad) to {where} in "
            f"{self.seconds:.1f} s ({rate:,.0f}/s){span}{pacing}"
        )


def _chunks(batch: Batch, size: int | None) -> list[tuple[int, int]]:
    n = len(batch)
    if size is None or size >= n:
        return [(0, n)] if n else []
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def write_jsonl(
    sim: Simulation,
    out: BinaryIO,
    *,
    pacer: Pacer | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> SinkReport:
    """Write every record of ``sim`` as one JSON line to ``out`` (a binary file or stdout).

    Stops early when ``should_stop()`` turns true (checked between chunks).
    """
    report = SinkReport()
    started = clock()
    size = pacer.chunk_records() if pacer else None
    try:
        for batch in sim.batches():
            for start, end in _chunks(batch, size):
                if should_stop():
                    return report
                if pacer is not None:
                    while (wait := pacer.delay(batch.first + start, clock())) > 0:
                        sleep(wait)
                        if should_stop():
                            return report
                out.write(b"\n".join(batch.values[start:end]) + b"\n")
                if pacer is not None:
                    out.flush()
                report.add(batch, start, end)
        out.flush()
        return report
    finally:
        report.seconds = clock() - started
        if pacer is not None:
            report.paced = True
            report.rebases, report.max_lag_s = pacer.rebases, pacer.max_lag_seen_s


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client (and aiokafka's default partitioner) gives ``key``.

    >>> kafka_partition(b"u42", 6)
    5
    """
    return int(partitions_of([key], partitions)[0])


class _Partitioner:
    """Partition of every record of a batch, by unit, experiment, or sticky round robin."""

    def __init__(self, sim: Simulation, partitions: list[int], key_by: KeyBy):
        if key_by == "unit" and sim.scenario.units is None:
            raise ValueError("key_by='unit' needs a unit pool; the scenario has units: null")
        self.sim = sim
        self.partitions = np.asarray(sorted(partitions), dtype=np.int64)
        self.key_by = key_by
        n = len(self.partitions)
        self._prefix = sim.scenario.unit_prefix.encode().replace(b"%", b"%%") + b"%d"
        self._exp_keys = [e.encode() for e in sim.experiment_ids]
        self._exp_part = np.array([kafka_partition(k, n) for k in self._exp_keys], dtype=np.int64)
        # Partition of each unit of the pool, filled in as units first appear.
        self._unit_part = np.full(sim.scenario.units or 0, -1, dtype=np.int64)
        self._next = 0

    def assign(self, batch: Batch, start: int, end: int) -> tuple[np.ndarray, list[bytes | None]]:
        n = len(self.partitions)
        if self.key_by == "unit":
            assert batch.unit is not None
            units = batch.unit[start:end]
            fmt = self._prefix
            keys: list[bytes | None] = [fmt % u for u in units.tolist()]
            parts = self._unit_part[units]
            missing = np.flatnonzero(parts < 0)
            if len(missing):
                new_units, first = np.unique(units[missing], return_index=True)
                self._unit_part[new_units] = partitions_of(
                    [keys[j] for j in missing[first].tolist()], n
                )
                parts = self._unit_part[units]
            return self.partitions[parts], keys
        if self.key_by == "experiment":
            codes = batch.experiment[start:end]
            return self.partitions[self._exp_part[codes]], [self._exp_keys[c] for c in codes]
        # Unkeyed: one partition per chunk, rotating (the sticky partitioner's idea).
        self._next = (self._next + 1) % n
        return np.full(end - start, self.partitions[self._next]), [None] * (end - start)


async def produce(
    sim: Simulation,
    producer: Any,
    topic: str,
    *,
    key_by: KeyBy = "unit",
    pacer: Pacer | None = None,
    stop: asyncio.Event | None = None,
    timestamps: Literal["wall", "event"] = "wall",
    on_chunk: Callable[[Batch, int, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SinkReport:
    """Send every record of ``sim`` to ``topic`` with a started ``AIOKafkaProducer``.

    Returns once everything sent is acknowledged by the broker (a delivery error raises).

    Parameters
    ----------
    key_by
        Record key: the unit id, the experiment id, or none (then each chunk goes to one
        partition, rotating).
    pacer
        Pace sends against the event-time clock; ``None`` sends as fast as the broker takes them.
    stop
        When set, stop after the current chunk.
    timestamps
        Kafka record timestamps: the producer's wall clock, or the records' event time.
    on_chunk
        Called with ``(batch, start, end)`` right after records ``start:end`` of a batch are
        handed to the producer (a benchmark notes the wall time a given record went out).
    """
    report = SinkReport()
    started = clock()
    partitions = sorted(await producer.partitions_for(topic))
    if not partitions:
        raise ValueError(f"topic {topic!r} has no partitions")
    partitioner = _Partitioner(sim, partitions, key_by)
    size = pacer.chunk_records() if pacer else None
    previous: list[asyncio.Future[Any]] = []  # the last block's deliveries
    current: list[asyncio.Future[Any]] = []  # this block's
    stopped = stop.is_set if stop is not None else (lambda: False)

    async def send_all() -> None:
        nonlocal previous, current
        for batch in sim.batches():
            for start, end in _chunks(batch, size):
                if stopped():
                    return
                if pacer is not None:
                    while (wait := pacer.delay(batch.first + start, clock())) > 0:
                        await _sleep_or_stop(wait, stop)
                        if stopped():
                            return
                current += await _send_chunk(
                    producer, topic, batch, start, end, partitioner, timestamps
                )
                report.add(batch, start, end)
                if on_chunk is not None:
                    on_chunk(batch, start, end)
            # Bound what is in flight: the previous block must be acknowledged before the next.
            await asyncio.gather(*previous)
            previous, current = current, []

    try:
        await send_all()
        await asyncio.gather(*previous, *current)
        return report
    except BaseException:
        # Failing or cancelled: do not leave deliveries unobserved.
        await asyncio.gather(*previous, *current, return_exceptions=True)
        raise
    finally:
        report.seconds = clock() - started
        if pacer is not None:
            report.paced = True
            report.rebases, report.max_lag_s = pacer.rebases, pacer.max_lag_seen_s


async def _sleep_or_stop(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


async def _send_chunk(
    producer: Any,
    topic: str,
    batch: Batch,
    start: int,
    end: int,
    partitioner: _Partitioner,
    timestamps: str,
) -> list[asyncio.Future[Any]]:
    parts, keys = partitioner.assign(batch, start, end)
    values = batch.values[start:end]
    if timestamps == "event":
        ts_ms: list[int | None] = np.round(batch.ts[start:end] * 1000.0).astype(np.int64).tolist()
    else:
        ts_ms = [None] * (end - start)
    futures = []
    order = np.argsort(parts, kind="stable")
    bounds = np.flatnonzero(np.diff(parts[order])) + 1
    for group in np.split(order, bounds):
        if not len(group):
            continue
        partition = int(parts[group[0]])
        builder = producer.create_batch()
        for j in group.tolist():
            if builder.append(key=keys[j], value=values[j], timestamp=ts_ms[j]) is None:
                futures.append(await producer.send_batch(builder, topic, partition=partition))
                builder = producer.create_batch()
                if builder.append(key=keys[j], value=values[j], timestamp=ts_ms[j]) is None:
                    raise ValueError(
                        f"record {batch.first + j} ({len(values[j])} bytes) does not fit in a "
                        "producer batch; raise max_batch_size"
                    )
        futures.append(await producer.send_batch(builder, topic, partition=partition))
    return futures


def run_cli(args: Any) -> int:
    """``armguard simulate``: the command-line edge (the only place that reads the clock)."""
    import dataclasses

    from .experiments import load_experiments
    from .settings import load_settings
    from .simulate import FieldNames, Scenario, load_scenario

    overrides = {"experiments_file": args.experiments} if args.experiments else {}
    settings = load_settings(args.settings, **overrides)
    experiments = load_experiments(settings.experiments_file)
    scenario = load_scenario(args.scenario) if args.scenario else Scenario()
    changes: dict[str, Any] = {}
    if args.records is not None:
        changes.update(records=args.records, duration_s=None)
    if args.duration_s is not None:
        changes.update(duration_s=args.duration_s, records=None)
    if args.rate is not None:
        changes["rate"] = args.rate
    if args.seed is not None:
        changes["seed"] = args.seed
    if changes:
        scenario = dataclasses.replace(scenario, **changes)
    start_ts = args.start_ts
    if start_ts is None and scenario.start_ts is None:
        start_ts = round(time.time(), 3)
    sim = Simulation(
        scenario,
        experiments,
        start_ts=start_ts,
        fields=FieldNames.from_ingest(settings.ingest),
        where=str(args.scenario or "scenario"),
    )
    pacer = Pacer(sim.rate) if (args.rate is not None or args.pace) else None
    # Everything built so far lives until exit: keep it out of the collector's full passes, which
    # otherwise rescan it while millions of short-lived (acyclic) records go by. ~25% less CPU.
    import gc

    gc.freeze()
    try:
        return _emit(args, settings, scenario, sim, pacer)
    finally:
        gc.unfreeze()  # the process may go on (tests call main() in-process)


def _emit(args: Any, settings: Any, scenario: Any, sim: Simulation, pacer: Pacer | None) -> int:
    import signal
    import sys
    from pathlib import Path

    if not args.kafka:
        stop = {"now": False}

        def on_signal(signum: int, frame: Any) -> None:
            stop["now"] = True

        import threading

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {
                sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
            }
        to_stdout = args.output in (None, "-")
        try:
            if to_stdout:
                where = "stdout"
                report = write_jsonl(
                    sim, sys.stdout.buffer, pacer=pacer, should_stop=lambda: stop["now"]
                )
            else:
                where = str(args.output)
                with Path(args.output).open("wb") as out:
                    report = write_jsonl(sim, out, pacer=pacer, should_stop=lambda: stop["now"])
        except BrokenPipeError:
            # The reader went away (`armguard simulate | head`): not an error. Point stdout at
            # /dev/null so the interpreter's final flush does not fail again.
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print(report.line(where), file=sys.stderr)
        return 0

    topic = args.topic or settings.topics.telemetry[0]
    key_by: KeyBy = args.key_by or ("unit" if scenario.units else "experiment")
    if key_by == "unit" and not scenario.units:
        from .errors import ConfigError, ConfigProblem

        raise ConfigError(
            [
                ConfigProblem(
                    "--key-by", "", "unit keys need a unit pool; the scenario has units: null"
                )
            ]
        )

    async def to_kafka() -> SinkReport:
        from aiokafka import AIOKafkaProducer
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import KafkaConnectionError

        from .errors import KafkaUnavailable
        from .kafka import kafka_options

        options = kafka_options(settings.kafka)
        admin = AIOKafkaAdminClient(**options)
        try:
            await admin.start()
        except KafkaConnectionError as exc:
            raise KafkaUnavailable(
                f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}"
            ) from exc
        try:
            if topic not in set(await admin.list_topics()):
                brokers = len((await admin.describe_cluster())["brokers"])
                new = NewTopic(
                    topic, num_partitions=args.partitions, replication_factor=min(3, brokers)
                )
                await admin.create_topics([new])
        finally:
            await admin.close()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (or Windows): stop with KeyboardInterrupt only
        producer = AIOKafkaProducer(**options, acks="all", linger_ms=5, max_batch_size=512 * 1024)
        await producer.start()
        try:
            return await produce(sim, producer, topic, key_by=key_by, pacer=pacer, stop=stop)
        finally:
            await producer.stop()

    report = asyncio.run(to_kafka())
    print(report.line(f"kafka topic {topic!r}"), file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``armguard simulate`` on the CLI's subparsers."""
    from pathlib import Path

    p = sub.add_parser(
        "simulate",
        help="generate experiment telemetry (file, stdout or Kafka), with injected regressions",
        description=(
            "Generate seeded telemetry records {experiment, arm, ts, unit, metrics, features} for "
            "the experiments of the experiments file (arms and allocation come from there), as "
            "JSON lines to a file or stdout (input for `armguard replay`) or to a Kafka topic. A "
            "scenario YAML (see config/simulate-demo.yaml) sets distributions, the unit pool and "
            "injected regressions, SRM, drift and bad records at event-time offsets. Event time "
            "starts now unless --start-ts or the scenario says otherwise. Without --records or "
            "--duration-s (or the scenario's records/duration_s) it runs until interrupted; "
            "a summary line goes to stderr."
        ),
    )
    p.add_argument("--settings", type=Path, help="YAML settings file (Kafka, topics, field names)")
    p.add_argument("--experiments", type=Path, help="experiments YAML (overrides the settings)")
    p.add_argument("--scenario", type=Path, metavar="FILE", help="scenario YAML")
    how_much = p.add_mutually_exclusive_group()
    how_much.add_argument("--records", type=int, metavar="N", help="number of records")
    how_much.add_argument(
        "--duration-s", type=float, metavar="S", help="seconds of event time to generate"
    )
    p.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="events per second of event time (overrides the scenario's rate) and pace output "
        "at this rate in real time; without --rate or --pace output goes as fast as possible",
    )
    p.add_argument(
        "--pace", action="store_true", help="pace output in real time at the scenario's rate"
    )
    p.add_argument("--seed", type=int, metavar="N", help="random seed (overrides the scenario)")
    p.add_argument(
        "--start-ts",
        type=float,
        metavar="UNIX",
        help="event time of the first record, unix seconds (default: the scenario's, else now)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--output", metavar="FILE", help="write JSON lines to FILE, or to stdout with '-' (default)"
    )
    out.add_argument(
        "--kafka", action="store_true", help="produce to Kafka (the settings' kafka section)"
    )
    p.add_argument(
        "--topic", help="Kafka topic (default: the first of the settings' topics.telemetry)"
    )
    p.add_argument(
        "--key-by",
        choices=("unit", "experiment", "none"),
        help="Kafka record key (default: unit, or experiment when the scenario has no units)",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=6,
        metavar="N",
        help="partitions of the Kafka topic if it does not exist yet (default: 6)",
    )
    p.set_defaults(handler=run_cli)
