"""Readiness probe for scripts/kafka-local: a real admin round trip, polled, never a fixed sleep.

Ready means the broker answers metadata and can create and delete a topic (so the controller
quorum is up). Exit 0 when ready, 1 on timeout or when the broker process (--pid) has died.
"""

import argparse
import asyncio
import logging
import os
import sys
import time
import uuid


async def probe(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        name = f"__armguard_ready_{uuid.uuid4().hex[:8]}"
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
        await admin.delete_topics([name])
    finally:
        await admin.close()


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--pid", type=int)
    args = ap.parse_args()
    # Connection refusals while the JVM starts are expected; report only the final outcome.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    deadline = time.monotonic() + args.timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive(args.pid):
            print(f"broker process {args.pid} exited", file=sys.stderr)
            return 1
        try:
            asyncio.run(asyncio.wait_for(probe(args.bootstrap), timeout=10))
            return 0
        except Exception as exc:  # retried until the deadline: the broker is still starting
            last = exc
            time.sleep(0.3)  # poll interval between real round trips, not a synchronisation
    print(f"broker at {args.bootstrap} not ready after {args.timeout} s: {last!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
