"""Operator CLI: ``armguard kill|pause|resume|override|acknowledge|status``.

Commands are signed with ``commands.hmac_key`` (set ``ARMGUARD_COMMANDS__HMAC_KEY``) and written to
the commands topic keyed by experiment. With ``--wait`` the CLI follows the decisions topic until
the daemon has applied or rejected the command, and says which. ``status`` reads the latest state
snapshot of each experiment from the compacted state topic.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from . import commands as cmds
from .errors import ConfigError, ConfigProblem, KafkaUnavailable
from .kafka import read_partition, topic_partitions

__all__ = ["add_parsers", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` to seconds.

    >>> parse_duration("15m"), parse_duration("2h"), parse_duration("45")
    (900.0, 7200.0, 45.0)
    """
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 2h or 1d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--settings", type=Path, help="YAML settings file (environment overrides)")
    common.add_argument("--user", default=None, help="who is acting (default: login name)")
    common.add_argument("--reason", default="", help="why; recorded in the audit log")
    common.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait up to this long for the daemon to apply or reject it (0: do not wait)",
    )
    for name, text in (
        ("kill", "kill an arm (or the whole experiment): its traffic falls back to control"),
        ("pause", "pause an arm (or the whole experiment) until resumed"),
        ("resume", "resume a killed or paused arm (or the whole experiment)"),
        ("acknowledge", "acknowledge the experiment's last decision (audited)"),
    ):
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.add_argument("experiment")
        p.add_argument("--arm", default=None, help="one arm; without it, the whole experiment")
        p.set_defaults(handler=_send, command_name=name)
    p = sub.add_parser(
        "override",
        parents=[common],
        help="silence one guardrail of an experiment for a while",
        description="Silence one guardrail until the duration (in event time) has passed.",
    )
    p.add_argument("experiment")
    p.add_argument("--guardrail", required=True, help="guardrail name, or 'srm'")
    p.add_argument("--duration", required=True, type=parse_duration, help="e.g. 30m, 2h, 1d")
    p.set_defaults(handler=_send, command_name="override", arm=None)

    p = sub.add_parser(
        "status",
        help="show the desired state and guardrails of experiments",
        description="Read the latest state snapshot of each experiment from the state topic.",
    )
    p.add_argument("experiment", nargs="?")
    p.add_argument("--settings", type=Path)
    p.add_argument("--json", action="store_true", help="print the snapshots' status as JSON lines")
    p.set_defaults(handler=_status)

    p = sub.add_parser(
        "watch",
        help="show guardrail status live until a kill-switch event arrives",
        description=(
            "Follow the state and kill-switch topics and redraw the guardrail status. With "
            "--until-event, exit 0 after printing the first new kill-switch event (1 on timeout)."
        ),
    )
    p.add_argument("experiment", nargs="?")
    p.add_argument("--settings", type=Path)
    p.add_argument("--until-event", action="store_true", help="exit after the first new event")
    p.add_argument("--timeout", type=float, default=0, help="give up after this many seconds")
    p.set_defaults(handler=_watch)


def _send(args: argparse.Namespace) -> int:
    from .settings import load_settings

    settings = load_settings(args.settings)
    key = settings.commands.hmac_key
    if key is None:
        raise ConfigError(
            [
                ConfigProblem(
                    "settings",
                    "commands.hmac_key",
                    "not set; export ARMGUARD_COMMANDS__HMAC_KEY with the daemon's shared key",
                )
            ]
        )
    obj = cmds.sign(
        cmds.new_command(
            args.command_name,
            args.experiment,
            user=args.user or getpass.getuser(),
            reason=args.reason,
            arm=args.arm,
            guardrail=getattr(args, "guardrail", None),
            duration_s=getattr(args, "duration", None),
            issued_at=time.time(),
        ),
        key.get_secret_value().encode(),
    )
    return asyncio.run(_send_async(settings, obj, args.wait))


async def _send_async(settings: Any, obj: dict[str, Any], wait_s: float) -> int:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from .kafka import kafka_options

    opts = kafka_options(settings.kafka)
    topics = settings.topics
    watcher = None
    if wait_s > 0:
        # Start reading the decisions topic at its end before sending, so the verdict is not missed.
        watcher = AIOKafkaConsumer(
            **opts, isolation_level="read_committed", enable_auto_commit=False
        )
        await watcher.start()
        parts = await topic_partitions(watcher, topics.decisions)
        tps = [TopicPartition(topics.decisions, p) for p in parts]
        watcher.assign(tps)
        await watcher.seek_to_end(*tps)
        for tp in tps:
            await watcher.position(tp)
    producer = AIOKafkaProducer(**opts, enable_idempotence=True, acks="all")
    try:
        await producer.start()
    except Exception as exc:
        if watcher is not None:
            await watcher.stop()
        raise KafkaUnavailable(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from exc
    try:
        meta = await producer.send_and_wait(
            topics.commands, orjson.dumps(obj), key=obj["experiment"].encode()
        )
    finally:
        await producer.stop()
    print(
        f"sent {obj['command']} for {obj['experiment']}"
        + (f" arm {obj['arm']}" if obj.get("arm") else "")
        + f" (id {obj['id']}, {topics.commands}[{meta.partition}]@{meta.offset})"
    )
    if watcher is None:
        return 0
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            batch = await watcher.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    verdict = _verdict(rec.value, obj, meta.partition, meta.offset)
                    if verdict is not None:
                        print(verdict[1])
                        return verdict[0]
        print(f"no verdict from the daemon within {wait_s:.0f} s; is it running?", file=sys.stderr)
        return 1
    finally:
        await watcher.stop()


def _verdict(
    value: bytes | None, obj: dict[str, Any], partition: int, offset: int
) -> tuple[int, str] | None:
    try:
        data = orjson.loads(value or b"{}").get("data") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("kind") == "command_rejected":
        off = data.get("offset") or {}
        if off.get("partition") == partition and off.get("offset") == offset:
            return 1, f"rejected: {data.get('reason')}: {data.get('detail')}"
    elif data.get("kind") == "command":
        op = (data.get("decision") or {}).get("operator") or {}
        if op.get("id") == obj["id"]:
            return (
                0,
                f"applied: experiment {data['experiment']} is {data['state']}, arms {data['arms']}",
            )
    return None


def _render(snaps: dict[str, dict[str, Any]], only: str | None) -> list[str]:
    lines = []
    for exp, snap in sorted(snaps.items()):
        if only and exp != only:
            continue
        try:
            lines += _render_one(exp, snap)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # another version's
            lines.append(f"{exp}: snapshot not readable by this version ({exc!r:.80})")
    return lines


def _render_one(exp: str, snap: dict[str, Any]) -> list[str]:
    lines = []
    d = snap["desired"]
    arms = ", ".join(f"{a}={s}" for a, s in d["arms"].items())
    lines.append(f"{exp}: {d['state']} (revision {snap['revision']}; arms {arms})")
    for row in snap["status"]["guardrails"]:
        est, lo, hi, p = (
            row.get("estimate"),
            row.get("lower"),
            row.get("upper"),
            row.get("p_value"),
        )
        nums = ""
        if est is not None:
            nums = f" estimate {est:+.4g}"
            if lo is not None and hi is not None:
                nums += f" [{lo:+.4g}, {hi:+.4g}]"
        if p is not None:
            nums += f" p={p:.3g}"
        if row.get("score") is not None:
            nums += f" score {row['score']:.3g}/{row.get('threshold') or 0:.3g}"
        lines.append(
            f"  {row['guardrail']:<24} {row['arm']:<14} {row['state']:<13}"
            f" n={row['n_control']}/{row['n_treatment']}{nums}"
        )
    srm = snap["status"].get("srm")
    if srm:
        p = srm.get("p_value")
        lines.append(
            f"  {'srm':<24} {'all':<14} {srm['state']:<13}"
            + (f" p={p:.3g}" if p is not None else "")
        )
    return lines


def _watch(args: argparse.Namespace) -> int:
    from .settings import load_settings

    settings = load_settings(args.settings)
    return asyncio.run(_watch_async(settings, args.experiment, args.until_event, args.timeout))


async def _watch_async(settings: Any, only: str | None, until_event: bool, limit_s: float) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from .kafka import kafka_options

    reader = AIOKafkaConsumer(
        **kafka_options(settings.kafka), isolation_level="read_committed", enable_auto_commit=False
    )
    await reader.start()
    tty = sys.stdout.isatty()
    snaps: dict[str, dict[str, Any]] = {}
    try:
        topics = settings.topics
        tps = []
        for topic in (topics.state, topics.killswitch):
            parts = await topic_partitions(reader, topic) or [0]
            tps += [TopicPartition(topic, p) for p in parts]
        reader.assign(tps)
        state_tps = [tp for tp in tps if tp.topic == topics.state]
        ks_tps = [tp for tp in tps if tp.topic == topics.killswitch]
        await reader.seek_to_beginning(*state_tps)
        await reader.seek_to_end(*ks_tps)
        for tp in ks_tps:
            await reader.position(tp)
        started = time.monotonic()
        last_drawn: list[str] = []
        while not limit_s or time.monotonic() - started < limit_s:
            batch = await reader.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for rec in records:
                    if rec.value is None:
                        continue
                    try:
                        obj = orjson.loads(rec.value)
                    except orjson.JSONDecodeError:
                        continue
                    if tp.topic == topics.state:
                        if isinstance(obj, dict) and "experiment" in obj:
                            snaps[obj["experiment"]] = obj
                        continue
                    if not isinstance(obj, dict) or (only and obj.get("subject") != only):
                        continue
                    print(f"\nkill-switch event on {tp.topic}[{tp.partition}]@{rec.offset}:")
                    print(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())
                    if until_event:
                        return 0
            lines = _render(snaps, only)
            if lines != last_drawn:
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")
                stamp = time.strftime("%H:%M:%S")
                print(f"[{stamp}] armguard guardrail status" + ("" if tty else ":"))
                print("\n".join(lines) if lines else "  (no state yet)")
                sys.stdout.flush()
                last_drawn = lines
        print(f"no kill-switch event within {limit_s:.0f} s", file=sys.stderr)
        return 1
    finally:
        await reader.stop()


def _status(args: argparse.Namespace) -> int:
    from .settings import load_settings

    settings = load_settings(args.settings)
    snaps = asyncio.run(_read_state(settings))
    if args.experiment:
        snaps = {k: v for k, v in snaps.items() if k == args.experiment}
        if not snaps:
            print(f"no state for experiment {args.experiment!r}", file=sys.stderr)
            return 1
    if args.json:
        for _, snap in sorted(snaps.items()):
            view = {k: snap[k] for k in ("experiment", "revision", "desired", "status")}
            print(orjson.dumps(view).decode())
        return 0
    print("\n".join(_render(snaps, args.experiment)))
    return 0


async def _read_state(settings: Any) -> dict[str, dict[str, Any]]:
    from aiokafka import AIOKafkaConsumer

    from .kafka import kafka_options

    reader = AIOKafkaConsumer(
        **kafka_options(settings.kafka), isolation_level="read_committed", enable_auto_commit=False
    )
    try:
        await reader.start()
    except Exception as exc:
        raise KafkaUnavailable(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from exc
    snaps: dict[str, dict[str, Any]] = {}
    try:
        topic = settings.topics.state
        for p in await topic_partitions(reader, topic):
            for rec in await read_partition(reader, topic, p):
                if rec.value is None:
                    continue
                try:
                    snap = orjson.loads(rec.value)
                    snaps[snap["experiment"]] = snap
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue
    finally:
        await reader.stop()
    return snaps
