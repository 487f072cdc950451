"""Shared fixtures. Integration tests use the real local broker that `make test` starts
(scripts/kafka-local); when it is missing they fail, they never skip."""

from __future__ import annotations

import asyncio
import os
import uuid

import hypothesis  # noqa: F401
import pytest

# Import hypothesis at collection time: its pytest plugin otherwise imports it lazily inside the
# terminal summary, deep in pytest's hook stack, where CPython 3.11.7's parser fails with
# "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905, fixed in 3.11.8).

BOOTSTRAP = os.environ.get("ARMGUARD_TEST_BOOTSTRAP", "127.0.0.1:19092")


def _broker_answers(bootstrap: str) -> str | None:
    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            await admin.list_topics()
        finally:
            await admin.close()

    try:
        asyncio.run(asyncio.wait_for(probe(), timeout=15))
    except Exception as exc:
        return repr(exc)
    return None


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap address of the real broker; a missing broker is a failure, not a skip."""
    error = _broker_answers(BOOTSTRAP)
    if error is not None:
        pytest.fail(
            f"no Kafka broker at {BOOTSTRAP} ({error}). Integration tests need the real broker: "
            "run `make test`, or `scripts/kafka-local start` first.",
            pytrace=False,
        )
    return BOOTSTRAP


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic and group names, so tests never share state."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def admin(kafka_bootstrap):
    from aiokafka.admin import AIOKafkaAdminClient

    client = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def make_topic(admin, unique):
    """Create a uniquely named topic: ``await make_topic("name", partitions=2, compact=False)``."""
    from aiokafka.admin import NewTopic

    created: list[str] = []

    async def create(base: str, partitions: int = 1, compact: bool = False) -> str:
        name = f"{base}-{unique}-{len(created)}"
        configs = {"cleanup.policy": "compact"} if compact else {}
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, topic_configs=configs)]
        )
        created.append(name)
        return name

    yield create
    if created:
        await admin.delete_topics(created)
