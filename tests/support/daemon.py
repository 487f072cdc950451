"""Run `armguard run` as a real subprocess, and read armguard's topics, for integration tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from armguard.daemon.kafka import topic_partitions

HMAC_KEY = "integration-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def topic_env(suffix: str, partitions: int = 2) -> dict[str, str]:
    """Settings environment for a daemon with its own topic names and groups."""
    return {
        "ARMGUARD_TOPICS__TELEMETRY": f'["telemetry-{suffix}"]',
        "ARMGUARD_TOPICS__SUMMARIES": f"summaries-{suffix}",
        "ARMGUARD_TOPICS__DEADLETTER": f"deadletter-{suffix}",
        "ARMGUARD_TOPICS__KILLSWITCH": f"killswitch-{suffix}",
        "ARMGUARD_TOPICS__DECISIONS": f"decisions-{suffix}",
        "ARMGUARD_TOPICS__STATE": f"state-{suffix}",
        "ARMGUARD_TOPICS__COMMANDS": f"commands-{suffix}",
        "ARMGUARD_TOPICS__PARTITIONS": str(partitions),
        "ARMGUARD_INGEST__GROUP_ID": f"ingest-{suffix}",
        "ARMGUARD_EVALUATE__GROUP_ID": f"evaluate-{suffix}",
    }


class DaemonProcess:
    """`armguard run` in a subprocess with settings from the environment."""

    def __init__(self, bootstrap: str, experiments: Path, env: dict[str, str], log: Path):
        self.port = free_port()
        self.env = {
            **os.environ,
            "ARMGUARD_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "ARMGUARD_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "ARMGUARD_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
            "ARMGUARD_HTTP__PORT": str(self.port),
            "ARMGUARD_COMMANDS__HMAC_KEY": HMAC_KEY,
            "ARMGUARD_EVALUATE__POLL_TIMEOUT_MS": "100",
            "ARMGUARD_INGEST__POLL_TIMEOUT_MS": "100",
            **env,
        }
        self.experiments = experiments
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "armguard.daemon.cli",
                "run",
                "--experiments",
                str(self.experiments),
            ],
            env=self.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        fh.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        """A GET against the daemon's HTTP server: (status, body); (0, b"") if it is not up."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return 0, b""
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        return status, body

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"daemon exited early:\n{self.log.read_text()[-4000:]}")
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.1)  # polling interval of an observable condition
        raise AssertionError(
            f"daemon not ready within {timeout} s:\n{self.log.read_text()[-4000:]}"
        )


async def produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for key, value in items:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every committed record of a topic (all partitions, up to the last stable offsets)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await reader.start()
    try:
        parts = await topic_partitions(reader, topic)
        tps = [TopicPartition(topic, p) for p in parts]
        if not tps:
            return []
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        out: list[Any] = []
        for tp in tps:
            while await reader.position(tp) < ends[tp]:
                batch = await reader.getmany(tp, timeout_ms=1000)
                out.extend(batch.get(tp, []))
        return out
    finally:
        await reader.stop()


async def read_json(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in await read_topic(bootstrap, topic) if r.value]


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """Sum over partitions of the group's committed offsets on ``topic``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(m.offset for tp, m in offsets.items() if tp.topic == topic and m.offset >= 0)


async def wait_for(predicate, what: str, limit_s: float = 60.0, interval: float = 0.2) -> Any:
    """Poll an async predicate until it returns a truthy value; fail after ``limit_s``."""
    timeout = limit_s
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)  # polling interval of an observable condition
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def end_total(bootstrap: str, topic: str) -> int:
    """Sum over partitions of the last stable offsets of ``topic``."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await reader.start()
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(reader, topic)]
        if not tps:
            return 0
        ends = await reader.end_offsets(tps)
        return sum(ends.values())
    finally:
        await reader.stop()


async def caught_up(bootstrap: str, group: str, topic: str) -> bool:
    """True when ``group`` has committed past the last committed data record of every partition
    of ``topic`` (offsets of transaction markers make offset arithmetic unreliable)."""
    last: dict[int, int] = {}
    for r in await read_topic(bootstrap, topic):
        last[r.partition] = max(last.get(r.partition, -1), r.offset)
    if not last:
        return False
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    committed = {tp.partition: m.offset for tp, m in offsets.items() if tp.topic == topic}
    return all(committed.get(p, -1) > off for p, off in last.items())
