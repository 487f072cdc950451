"""Exactly once with real `armguard run` processes: kill -9 and restart, and a zombie
(SIGSTOP past its session timeout, then SIGCONT). Afterwards the summaries' offset ranges tile
every input partition with no gap and no overlap, and merged they equal one pass over the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from armguard.daemon.contract import Contract
from armguard.daemon.settings import IngestSettings

from .ingest_support import (
    EXPERIMENTS_YAML,
    assert_offsets_tile,
    assert_same_summaries,
    committed,
    end_offsets,
    experiments,
    good_records,
    merge_summaries,
    produce,
    read_topic,
    reference,
    wait_for,
)

pytestmark = pytest.mark.integration

ARMGUARD = str(Path(sys.executable).with_name("armguard"))
PARTITIONS = 2


class Instance:
    """One `armguard run` process with its log file."""

    def __init__(self, name: str, settings: Path, experiments: Path, log: Path):
        self.name = name
        self.log = log
        env = {
            **os.environ,
            "ARMGUARD_EVALUATE__ENABLED": "false",
            "ARMGUARD_HTTP__PORT": "0",
        }
        self._out = open(log, "wb")
        self.args = [
            ARMGUARD,
            "run",
            "--settings",
            str(settings),
            "--experiments",
            str(experiments),
        ]
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Instance:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, env=self.env, stdout=self._out, stderr=self._out
        )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        finally:
            self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if not self._out.closed:
            self._out.close()


@pytest.fixture
async def setup(kafka_bootstrap, make_topic, unique, tmp_path):
    topic = await make_topic("telemetry", partitions=PARTITIONS)
    summaries = await make_topic("summaries", partitions=2)
    deadletter = await make_topic("deadletter")
    group = f"ingest-{unique}"

    def write_settings(name: str, **ingest) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "kafka": {
                        "bootstrap_servers": kafka_bootstrap,
                        "session_timeout_ms": 6000,
                        "heartbeat_interval_ms": 1000,
                        "max_poll_interval_ms": 20000,
                    },
                    "topics": {
                        "telemetry": [topic],
                        "summaries": summaries,
                        "deadletter": deadletter,
                    },
                    "ingest": {"group_id": group, **ingest},
                    "log_level": "INFO",
                }
            )
        )
        return path

    exps = tmp_path / "experiments.yaml"
    exps.write_text(EXPERIMENTS_YAML)
    instances: list[Instance] = []

    def instance(name: str, settings: Path) -> Instance:
        inst = Instance(name, settings, exps, tmp_path / f"{name}.log")
        instances.append(inst)
        return inst

    yield {
        "topic": topic,
        "summaries": summaries,
        "group": group,
        "settings": write_settings,
        "instance": instance,
    }
    for inst in instances:
        await inst.ensure_dead()


async def _check_exactly_once(bootstrap: str, topic: str, summaries: str) -> None:
    ends = await end_offsets(bootstrap, topic, PARTITIONS)
    out = [r.value for r in await read_topic(bootstrap, summaries)]
    assert_offsets_tile(out, ends, topic, contiguous=True)
    inputs = await read_topic(bootstrap, topic)
    by_partition: dict[int, list] = {}
    for r in inputs:
        by_partition.setdefault(r.partition, []).append(r)
    contract = Contract(experiments(), IngestSettings())
    assert_same_summaries(merge_summaries(out), reference(contract, topic, by_partition))


async def _total(admin, group: str, topic: str) -> int:
    return sum((await committed(admin, group, topic, PARTITIONS)).values())


async def test_kill_9_then_restart_equals_an_uninterrupted_run(kafka_bootstrap, admin, setup):
    topic, group = setup["topic"], setup["group"]
    n = 30_000
    await produce(kafka_bootstrap, topic, list(good_records(n, time.time(), seed=7)), partitions=2)
    # Many small transactions, so the kill lands in the middle of the run.
    settings = setup["settings"](
        "run", flush_interval_s=0.2, max_pending_records=200, max_batch_records=100
    )
    first = await setup["instance"]("first", settings).start()
    await wait_for(lambda: _progress(admin, group, topic, first, 0.2 * n), "first commits")
    first.signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    at_kill = await _total(admin, group, topic)
    assert 0 < at_kill < n, "the kill must land mid-run"

    second = await setup["instance"]("second", settings).start()
    await wait_for(
        lambda: _progress(admin, group, topic, second, n), "restart to finish", timeout_s=90
    )
    second.signal(signal.SIGTERM)
    started = time.monotonic()
    assert await second.wait() == 0, second.text()[-3000:]
    assert time.monotonic() - started < 10
    assert "armguard stopped after" in second.text()
    await _check_exactly_once(kafka_bootstrap, topic, setup["summaries"])


async def _progress(admin, group: str, topic: str, inst: Instance, at_least: float) -> bool:
    if inst.proc is not None and inst.proc.returncode is not None:
        raise AssertionError(f"{inst.name} exited early:\n{inst.text()[-3000:]}")
    return await _total(admin, group, topic) >= at_least


async def test_zombie_after_sigstop_cannot_commit_a_duplicate(kafka_bootstrap, admin, setup):
    topic, group = setup["topic"], setup["group"]
    # Telemetry keeps arriving, so the paused instance holds folded, uncommitted records.
    stop_feed = asyncio.Event()
    fed = 0

    async def feed() -> None:
        nonlocal fed
        seed = 100
        while not stop_feed.is_set():
            batch = good_records(400, time.time(), seed=seed)
            await produce(kafka_bootstrap, topic, list(batch), partitions=2)
            fed += len(batch)
            seed += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_feed.wait(), 0.2)  # the feed's rate, not a sync

    feeder = asyncio.create_task(feed())
    settings = setup["settings"]("run", flush_interval_s=1.0, max_pending_records=100_000)
    zombie = await setup["instance"]("zombie", settings).start()
    try:
        await wait_for(lambda: _progress(admin, group, topic, zombie, 1), "the first commit")
        zombie.signal(signal.SIGSTOP)
        at_stop = await _total(admin, group, topic)
        successor = await setup["instance"]("successor", settings).start()
        # The successor takes the partitions after the zombie's session timeout (6 s) and
        # commits past where the zombie stopped.
        await wait_for(
            lambda: _progress(admin, group, topic, successor, at_stop + 2000),
            "the successor to take over",
            timeout_s=60,
        )
        zombie.signal(signal.SIGCONT)
        # The zombie wakes with records folded before the pause: its commit must be refused.
        await wait_for(lambda: "fenced" in zombie.text(), "the zombie to be fenced", timeout_s=30)
    finally:
        stop_feed.set()
        await feeder
    await wait_for(
        lambda: _all_committed(admin, group, topic, kafka_bootstrap, [zombie, successor]),
        "both instances to commit all input",
        timeout_s=60,
    )
    for inst in (zombie, successor):
        inst.signal(signal.SIGTERM)
    for inst in (zombie, successor):
        assert await inst.wait() == 0, inst.text()[-3000:]
    assert fed > 0
    await _check_exactly_once(kafka_bootstrap, topic, setup["summaries"])


async def _all_committed(admin, group, topic, bootstrap, instances) -> bool:
    for inst in instances:
        if inst.proc.returncode is not None:
            raise AssertionError(f"{inst.name} exited early:\n{inst.text()[-3000:]}")
    ends = await end_offsets(bootstrap, topic, PARTITIONS)
    return await committed(admin, group, topic, PARTITIONS) == ends
