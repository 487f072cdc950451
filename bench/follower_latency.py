"""Kill-switch latency: from the commit of a kill-switch event to ``allowed()`` turning false.

A transactional producer commits kills one by one (one experiment each, like the evaluate stage);
a :class:`~armguard.daemon.follower.KillSwitchFollower` on the same local broker records when each
arm stops being allowed. Two clocks per kill, both ``time.perf_counter`` in one process:

* ``commit call``: from calling ``commit_transaction()`` to ``allowed()`` false (upper bound: it
  includes the commit round trip);
* ``commit return``: from ``commit_transaction()`` returning (can be ~0: the follower may see the
  commit before the producer hears back).

Usage: ``.venv/bin/python bench/follower_latency.py [--kills 200] [--bootstrap 127.0.0.1:19092]``
(creates and deletes its own topic; target p99 < 500 ms on the local broker).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from armguard.daemon.follower import KillSwitchFollower
from armguard.daemon.settings import KafkaSettings


def _event(experiment: str, revision: int, treatment: str) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "armguard",
            "type": "armguard.killswitch.v1",
            "subject": experiment,
            "time": "2025-11-28T03:20:00.000Z",
            "datacontenttype": "application/json",
            "data": {
                "experiment": experiment,
                "revision": revision,
                "state": "running",
                "arms": {"control": "running", "treatment": treatment},
                "cause": "guardrail",
            },
        }
    )


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def measure(bootstrap: str, kills: int, poll_timeout_ms: int) -> dict[str, list[float]]:
    topic = f"bench-killswitch-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 3, 1, topic_configs={"cleanup.policy": "compact"})])
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"bench-{uuid.uuid4().hex[:8]}", linger_ms=0
    )
    await producer.start()
    try:
        # Every experiment starts running (one transaction), then the follower bootstraps.
        async with producer.transaction():
            for i in range(kills):
                await producer.send(
                    topic, _event(f"exp-{i}", 1, "running"), key=f"exp-{i}".encode()
                )
        follower = KillSwitchFollower(
            KafkaSettings(bootstrap_servers=bootstrap), topic=topic, poll_timeout_ms=poll_timeout_ms
        )
        seen: dict[str, float] = {}
        flipped = asyncio.Event()

        def on_change(exp: str, old: object, new: object) -> None:
            seen.setdefault(exp, time.perf_counter())
            flipped.set()

        follower.on_change(on_change)
        call: list[float] = []
        ret: list[float] = []
        async with follower:
            for i in range(kills):
                exp = f"exp-{i}"
                await producer.begin_transaction()
                await producer.send(topic, _event(exp, 2, "killed"), key=exp.encode())
                t_call = time.perf_counter()
                await producer.commit_transaction()
                t_ret = time.perf_counter()
                while exp not in seen:
                    flipped.clear()
                    await asyncio.wait_for(flipped.wait(), 10)
                assert not follower.allowed(exp, "treatment")
                call.append(seen[exp] - t_call)
                ret.append(seen[exp] - t_ret)
                await asyncio.sleep(0.01)  # kills are rare; do not measure a queue
        return {"commit call": call, "commit return": ret}
    finally:
        await producer.stop()
        await admin.delete_topics([topic])
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--poll-timeout-ms", type=int, default=200)
    args = parser.parse_args()
    results = asyncio.run(measure(args.bootstrap, args.kills, args.poll_timeout_ms))
    print(f"kill-switch commit to allowed() false, {args.kills} kills, local broker:")
    print("| from | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        print(
            f"| {name} | {statistics.median(ms):.1f} | {_pct(ms, 0.9):.1f} | "
            f"{_pct(ms, 0.99):.1f} | {max(ms):.1f} |"
        )


if __name__ == "__main__":
    main()
