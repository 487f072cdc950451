"""The Kafka edge's shared pieces: client options from the settings, and armguard's topics.

Every aiokafka client armguard builds (consumers, producers, the admin client) gets its
connection options from :func:`kafka_options`, so security settings are written once. The
group and transaction settings have their own helpers because only consumers, respectively
transactional producers, take them.

:func:`ensure_topics` creates the topics armguard writes, with the configuration each one's job
needs; topics that already exist are left as they are (their configuration is the operator's).

========================  ===========  ====================================================
topic                     cleanup      why
========================  ===========  ====================================================
``armguard.summaries``    delete 7 d   ingest output; evaluate's snapshots make it disposable
``armguard.deadletter``   delete 14 d  rejected telemetry, kept long enough to investigate
``armguard.decisions``    delete 365 d the audit log of every decision
``armguard.commands``     delete 7 d   operator commands; their effect lives in the state
``armguard.killswitch``   compact      the current decision per experiment is what matters
``armguard.state``        compact      the latest snapshot per key restores evaluate
========================  ===========  ====================================================

Examples
--------
>>> from armguard.daemon.settings import KafkaSettings
>>> opts = kafka_options(KafkaSettings(bootstrap_servers="broker:9092", client_id="ag"))
>>> opts["bootstrap_servers"], opts["client_id"], opts["security_protocol"]
('broker:9092', 'ag', 'PLAINTEXT')
>>> sorted(topic_configs(Settings())["armguard.state"].items())
[('cleanup.policy', 'compact'), ('max.message.bytes', '8388608'), ('min.cleanable.dirty.ratio', '0.1')]
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .errors import ArmguardError
from .settings import KafkaSettings, Settings

__all__ = [
    "MAX_SUMMARY_BYTES",
    "consumer_group_options",
    "ensure_topics",
    "kafka_options",
    "producer_max_request_bytes",
    "retrieve_exception",
    "topic_configs",
    "transactional_producer_options",
]

log = logging.getLogger("armguard.kafka")

_DAY_MS = 86_400_000

# One summary record holds an experiment's per-arm histograms: a few KiB to a few hundred KiB
# in practice; 8 MiB leaves room for many arms and features with wide histograms.
MAX_SUMMARY_BYTES = 8 * 1024 * 1024


def kafka_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by every aiokafka client (consumer, producer, admin).

    Bootstrap servers, client id, security protocol, SASL credentials, an SSL context built from
    the configured files, the request timeout and the metadata refresh interval.
    """
    opts: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
        # New telemetry topics (or partitions) are found within this time, not Kafka's 5 minutes.
        "metadata_max_age_ms": kafka.metadata_max_age_ms,
    }
    if kafka.security_protocol.startswith("SASL_"):
        opts["sasl_mechanism"] = kafka.sasl_mechanism
        opts["sasl_plain_username"] = kafka.sasl_username
        opts["sasl_plain_password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password is not None else None
        )
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context(
            cafile=kafka.ssl_cafile,
            certfile=kafka.ssl_certfile,
            keyfile=kafka.ssl_keyfile,
            password=(
                kafka.ssl_key_password.get_secret_value()
                if kafka.ssl_key_password is not None
                else None
            ),
        )
    return opts


def consumer_group_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Group membership options for consumers of a consumer group."""
    return {
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
    }


def producer_max_request_bytes(settings: Settings) -> int:
    """Largest request a producer of armguard sends: a summary or a dead letter with headers."""
    return max(MAX_SUMMARY_BYTES, settings.ingest.max_record_bytes + 64 * 1024)


def transactional_producer_options(settings: Settings, transactional_id: str) -> dict[str, Any]:
    """Options of a transactional producer (idempotent, acks=all)."""
    return {
        **kafka_options(settings.kafka),
        "transactional_id": transactional_id,
        "transaction_timeout_ms": settings.kafka.transaction_timeout_ms,
        "acks": "all",
        "enable_idempotence": True,
        "max_request_size": producer_max_request_bytes(settings),
        "linger_ms": 5,
        # Ingest appends a flush's summaries into one batch per partition.
        "max_batch_size": 1024 * 1024,
    }


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """The topic configuration armguard wants for each of its topics, by topic name."""
    t = settings.topics
    max_bytes = str(producer_max_request_bytes(settings))

    def delete(days: int) -> dict[str, str]:
        return {
            "cleanup.policy": "delete",
            "retention.ms": str(days * _DAY_MS),
            "max.message.bytes": max_bytes,
        }

    def compact() -> dict[str, str]:
        return {
            "cleanup.policy": "compact",
            "min.cleanable.dirty.ratio": "0.1",
            "max.message.bytes": max_bytes,
        }

    return {
        t.summaries: delete(7),
        t.deadletter: delete(14),
        t.decisions: delete(365),
        t.commands: delete(7),
        t.killswitch: compact(),
        t.state: compact(),
    }


async def ensure_topics(
    admin: Any,
    settings: Settings,
    *,
    names: list[str] | None = None,
    partitions: int = 6,
    replication_factor: int | None = None,
) -> list[str]:
    """Create armguard's topics that do not exist yet; return the names created.

    Parameters
    ----------
    admin
        A started ``aiokafka.admin.AIOKafkaAdminClient``.
    settings
        The daemon settings (topic names, record size limit).
    names
        Only these of armguard's topics (default: all of them).
    partitions
        Partitions of each new topic. Summaries, state and kill switch are keyed by experiment,
        so they share one partition count.
    replication_factor
        Replicas of each new topic; default min(3, number of brokers).
    """
    from aiokafka.admin import NewTopic

    wanted = topic_configs(settings)
    if names is not None:
        unknown = sorted(set(names) - set(wanted))
        if unknown:
            raise ValueError(f"not armguard topics: {unknown}; known: {sorted(wanted)}")
        wanted = {n: c for n, c in wanted.items() if n in names}
    existing = set(await admin.list_topics())
    missing = [n for n in wanted if n not in existing]
    if not missing:
        return []
    if replication_factor is None:
        cluster = await admin.describe_cluster()
        replication_factor = max(1, min(3, len(cluster["brokers"])))
    response = await admin.create_topics(
        [
            NewTopic(
                n,
                num_partitions=partitions,
                replication_factor=replication_factor,
                topic_configs=wanted[n],
            )
            for n in missing
        ]
    )
    created = []
    for err in response.to_object()["topic_errors"]:
        if err["error_code"] == 0:
            created.append(err["topic"])
        elif err["error_code"] != 36:  # TOPIC_ALREADY_EXISTS: another instance won the race
            raise ArmguardError(
                f"could not create topic {err['topic']!r}: error {err['error_code']} "
                f"{err['error_message']}"
            )
    if created:
        log.info("created topics %s", ", ".join(created))
    return created


async def topic_partitions(consumer: Any, topic: str) -> list[int]:
    """Partition numbers of ``topic``, fetching fresh metadata (a consumer only tracks the
    topics it is assigned or subscribed to, so ``partitions_for_topic`` alone can say None)."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        cluster = await consumer._client.fetch_all_metadata()
        parts = cluster.partitions_for_topic(topic)
    return sorted(parts or ())


async def read_partition(
    consumer: Any, topic: str, partition: int, start: int | None = None, stop: int | None = None
) -> list[Any]:
    """The records of one partition from ``start`` (default: the beginning) up to ``stop`` or
    its end (the last stable offset for a read_committed consumer); [] if there is no such
    partition. The consumer is assigned that one partition."""
    from aiokafka import TopicPartition

    if partition not in await topic_partitions(consumer, topic):
        return []
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    if start is None:
        await consumer.seek_to_beginning(tp)
    else:
        consumer.seek(tp, start)
    end = (await consumer.end_offsets([tp]))[tp]
    if stop is not None:
        end = min(end, stop)
    records: list[Any] = []
    while await consumer.position(tp) < end:
        batch = await consumer.getmany(tp, timeout_ms=1000, max_records=10_000)
        records.extend(r for r in batch.get(tp, []) if r.offset < end)
    return records


def retrieve_exception(future: asyncio.Future[Any]) -> None:
    """Mark a send future's exception as retrieved (a ``done`` callback).

    When a transaction fails, its sends' futures fail with it, and the stage handles the error
    it raised; without this, asyncio logs "Future exception was never retrieved" for each of
    them when they are freed.
    """
    if not future.cancelled():
        future.exception()
