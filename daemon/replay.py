"""``armguard replay``: the same ingest and evaluate code, without a broker, deterministically.

Two inputs:

* **Telemetry** (a JSONL file, or a topic offset range read from a broker): records are folded by
  the ingest stage's :class:`~armguard.daemon.contract.PartitionAccumulator` and the summaries are
  cut by record count (``--cut-records``) or by event time (``--cut-seconds``), never by the wall
  clock, then applied to the evaluate stage's :class:`~armguard.daemon.engine.Engine`. A file has
  no arrival times, so each record counts as arriving at the stream's watermark (the latest event
  time seen so far that was not itself beyond the allowed future skew), and the freshness window
  is judged against that; a topic's records keep their Kafka timestamps.
* **Summaries** (``--summaries``: the ``armguard.summaries`` topic, from its beginning or an
  offset range): the live daemon's own cuts, so the decisions and kill-switch events come out bit
  for bit as the live daemon wrote them.

Decisions are printed to stdout as the same CloudEvents JSON lines the daemon writes to the
kill-switch topic (``--decisions`` adds the audit records). A progress bar goes to stderr when it
is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from .contract import Contract, PartitionAccumulator, RawRecord
from .engine import Engine, Output
from .experiments import ExperimentsFile, load_experiments
from .kafka import read_partition, topic_partitions
from .settings import Settings, load_settings

__all__ = ["Replayer", "add_parser", "iter_jsonl"]


class Replayer:
    """Feeds telemetry or summaries through the pure ingest and evaluate code.

    Parameters
    ----------
    experiments, settings
        As the live daemon has them (the contract, field paths and evaluation interval).
    cut_records
        Cut a summary after this many records (ignored when ``cut_seconds`` is given).
    cut_seconds
        Cut a summary when a record's event time crosses a multiple of this many seconds.
    """

    def __init__(
        self,
        experiments: ExperimentsFile,
        settings: Settings,
        *,
        cut_records: int = 10_000,
        cut_seconds: float | None = None,
    ):
        if cut_records < 1:
            raise ValueError("cut_records must be >= 1")
        if cut_seconds is not None and cut_seconds <= 0:
            raise ValueError("cut_seconds must be > 0")
        self.contract = Contract(experiments, settings.ingest)
        key = settings.commands.hmac_key
        self.engine = Engine(
            experiments,
            evaluation_interval_s=settings.evaluate.evaluation_interval_s,
            hmac_key=key.get_secret_value().encode() if key is not None else None,
            command_max_age_s=settings.commands.max_age_s,
        )
        self.cut_records = cut_records
        self.cut_seconds = cut_seconds
        self.summaries_topic = settings.topics.summaries
        self._ts_path = tuple(settings.ingest.ts_field.split("."))
        self._seq = 0
        self.records = 0
        self.summaries = 0

    def _event_time(self, value: bytes) -> float | None:
        try:
            v: Any = orjson.loads(value)
            for part in self._ts_path:
                v = v[part]
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            return None
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    def telemetry(
        self, records: Iterable[RawRecord], *, topic: str, partition: int, arrival: str
    ) -> Iterator[Output]:
        """Fold telemetry records of one partition; yield the outputs of each cut.

        ``arrival`` is ``"event"`` (a file: each record arrives at its event time) or
        ``"kafka"`` (the records' own Kafka timestamps).
        """
        acc = PartitionAccumulator(self.contract, topic, partition)
        batch: list[RawRecord] = []
        window: float | None = None
        watermark: float | None = None
        skew = self.contract.max_future_skew_s
        for rec in records:
            self.records += 1
            if arrival == "event":
                # A file has no arrival times: a record "arrives" at the stream's watermark (the
                # latest event time seen that was not itself too far in the future), so the
                # freshness window judges it as the live daemon would on a real-time stream.
                ts = self._event_time(rec.value or b"")
                if watermark is None or (ts is not None and watermark < ts <= watermark + skew):
                    watermark = ts if ts is not None else watermark
                rec = rec._replace(timestamp=int((watermark or ts or 0.0) * 1000))
            if self.cut_seconds is not None:
                ts = self._event_time(rec.value or b"")
                w = None if ts is None else ts // self.cut_seconds
                if w is not None and window is not None and w != window and batch:
                    yield from self._flush(acc, batch)
                    batch = []
                if w is not None:
                    window = w
            batch.append(rec)
            if self.cut_seconds is None and len(batch) >= self.cut_records:
                yield from self._flush(acc, batch)
                batch = []
        if batch:
            yield from self._flush(acc, batch)

    def _flush(self, acc: PartitionAccumulator, batch: list[RawRecord]) -> Iterator[Output]:
        acc.fold(batch)
        flush = acc.drain()
        if flush is None:
            return
        run = []
        for _key, value in flush.summaries:
            run.append((value, 0, self._seq))
            self._seq += 1
        yield from self.summary_run(run)
        yield from self.engine.snapshots()

    def summary_run(
        self, records: list[tuple[bytes, int, int]], keys: list[bytes] | None = None
    ) -> Iterator[Output]:
        """Apply a run of ``(value, partition, offset)`` summary records (no command between
        them) as the evaluate stage would: drift updates batched, decisions as one by one.
        ``keys``, the records' Kafka keys when read from the topic, are checked as live."""
        self.summaries += len(records)
        runs = self.engine.apply_summaries(
            [(value, self.summaries_topic, p, off) for value, p, off in records], keys=keys
        )
        for outs in runs:
            yield from outs


def iter_jsonl(fh: IO[bytes], progress: _Progress | None = None) -> Iterator[RawRecord]:
    """Records of a JSONL file, offset = line number (0-based); blank lines are skipped."""
    for i, line in enumerate(fh):
        if progress is not None:
            progress.advance(len(line))
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        yield RawRecord(offset=i, value=line)


class _Progress:
    """A one-line progress bar on stderr, drawn only on a terminal."""

    def __init__(self, total: int, stream: IO[str] = sys.stderr):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = -1

    def advance(self, n: int) -> None:
        self.done += n
        pct = int(100 * self.done / self.total)
        if self.enabled and pct != self._last:
            self._last = pct
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            self.stream.write(f"\rreplay [{bar}] {pct:3d}%")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="replay telemetry or summaries through ingest and evaluate, without a broker",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("telemetry", nargs="?", type=Path, help="telemetry JSONL file ('-': stdin)")
    p.add_argument(
        "--config",
        "--experiments",
        dest="experiments",
        type=Path,
        required=True,
        help="experiments YAML, as the live daemon has it",
    )
    p.add_argument("--settings", type=Path, help="daemon settings YAML (field paths, intervals)")
    p.add_argument(
        "--cut-records", type=int, default=10_000, help="records per summary cut (default 10000)"
    )
    p.add_argument(
        "--cut-seconds",
        type=float,
        default=None,
        help="cut summaries at multiples of this event time instead",
    )
    p.add_argument("--decisions", action="store_true", help="also print the audit records")
    p.add_argument("--topic", help="read telemetry from this topic instead of a file")
    p.add_argument(
        "--summaries",
        action="store_true",
        help="read the summaries topic: reproduces the live decisions bit for bit",
    )
    p.add_argument("--partition", type=int, default=None, help="only this partition")
    p.add_argument("--start", type=int, default=None, help="first offset (default: beginning)")
    p.add_argument("--end", type=int, default=None, help="stop before this offset (default: end)")
    p.set_defaults(handler=_main)


def _emit(outputs: Iterable[Output], decisions: bool, out: IO[bytes]) -> int:
    n = 0
    for o in outputs:
        if o.kind == "killswitch" or (decisions and o.kind == "decisions"):
            out.write(o.value + b"\n")
            n += o.kind == "killswitch"
    return n


def _main(args: argparse.Namespace) -> int:
    settings = load_settings(args.settings)
    experiments = load_experiments(args.experiments)
    rep = Replayer(
        experiments, settings, cut_records=args.cut_records, cut_seconds=args.cut_seconds
    )
    out = sys.stdout.buffer
    events = 0
    if args.summaries or args.topic:
        events = asyncio.run(_from_kafka(rep, settings, args, out))
    else:
        if args.telemetry is None:
            print("error: give a telemetry file, --topic or --summaries", file=sys.stderr)
            return 2
        if str(args.telemetry) == "-":
            events = _emit(
                rep.telemetry(
                    iter_jsonl(sys.stdin.buffer), topic="-", partition=0, arrival="event"
                ),
                args.decisions,
                out,
            )
        else:
            if not args.telemetry.is_file():
                print(f"error: {args.telemetry}: file not found", file=sys.stderr)
                return 2
            progress = _Progress(os.path.getsize(args.telemetry))
            with args.telemetry.open("rb") as fh:
                events = _emit(
                    rep.telemetry(
                        iter_jsonl(fh, progress),
                        topic=str(args.telemetry),
                        partition=0,
                        arrival="event",
                    ),
                    args.decisions,
                    out,
                )
            progress.close()
    out.flush()
    print(
        f"replay: {rep.records} records, {rep.summaries} summaries, {events} kill-switch events",
        file=sys.stderr,
    )
    return 0


async def _from_kafka(
    rep: Replayer, settings: Settings, args: argparse.Namespace, out: IO[bytes]
) -> int:
    from aiokafka import AIOKafkaConsumer

    from .errors import KafkaUnavailable
    from .kafka import kafka_options

    topic = settings.topics.summaries if args.summaries else args.topic
    reader = AIOKafkaConsumer(
        **kafka_options(settings.kafka), isolation_level="read_committed", enable_auto_commit=False
    )
    try:
        await reader.start()
    except Exception as exc:
        raise KafkaUnavailable(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from exc
    events = 0
    try:
        parts = await topic_partitions(reader, topic)
        if args.partition is not None:
            parts = [p for p in parts if p == args.partition]
        for p in parts:
            records = await read_partition(reader, topic, p, args.start, args.end)
            if args.summaries:
                # Operator commands of the same partition are applied in timestamp order among
                # the summaries, as the live evaluate stage orders them.
                items = [(r.timestamp, topic, r.offset, r) for r in records]
                items += [
                    (r.timestamp, settings.topics.commands, r.offset, r)
                    for r in await read_partition(reader, settings.topics.commands, p, None, None)
                ]
                items.sort(key=lambda it: it[:3])
                # Runs of summaries between commands are applied at once, as live.
                for is_summary, group in itertools.groupby(items, key=lambda it: it[1] == topic):
                    if is_summary:
                        members = list(group)
                        run = [(r.value or b"", p, off) for _ts, _t, off, r in members]
                        keys = [r.key or b"" for *_, r in members]
                        events += _emit(rep.summary_run(run, keys), args.decisions, out)
                        continue
                    for _ts, t, off, r in group:
                        outs = rep.engine.apply_command(
                            r.value,
                            topic=t,
                            partition=p,
                            offset=off,
                            timestamp_s=r.timestamp / 1000.0,
                        )
                        events += _emit(outs, args.decisions, out)
            else:
                raw = [RawRecord(r.offset, r.value, r.key, r.timestamp) for r in records]
                events += _emit(
                    rep.telemetry(raw, topic=topic, partition=p, arrival="kafka"),
                    args.decisions,
                    out,
                )
    finally:
        await reader.stop()
    return events
