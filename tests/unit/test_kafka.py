"""Client options from the settings, and topic creation (against a fake admin; the real broker
is exercised by the integration tests)."""

from __future__ import annotations

import ssl

import pytest

from armguard.daemon.errors import ArmguardError
from armguard.daemon.kafka import (
    consumer_group_options,
    ensure_topics,
    kafka_options,
    topic_configs,
    transactional_producer_options,
)
from armguard.daemon.settings import KafkaSettings, Settings


def test_plaintext_options_carry_no_credentials():
    opts = kafka_options(KafkaSettings(bootstrap_servers="b:9092", request_timeout_ms=1234))
    assert opts == {
        "bootstrap_servers": "b:9092",
        "client_id": "armguard",
        "security_protocol": "PLAINTEXT",
        "request_timeout_ms": 1234,
        "metadata_max_age_ms": 10_000,
    }


def test_sasl_ssl_options_unwrap_the_secret_and_build_a_context():
    k = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="armguard",
        sasl_password="s3cret",
    )
    opts = kafka_options(k)
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("armguard", "s3cret")
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert "s3cret" not in repr(k)


def test_group_and_transaction_options():
    s = Settings(kafka={"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000})
    assert consumer_group_options(s.kafka) == {
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "max_poll_interval_ms": 300_000,
    }
    p = transactional_producer_options(s, "g-t-0")
    assert p["transactional_id"] == "g-t-0" and p["acks"] == "all" and p["enable_idempotence"]
    assert p["max_request_size"] >= s.ingest.max_record_bytes + 1024


def test_topic_configs_compact_the_keyed_state_and_retain_the_logs():
    c = topic_configs(Settings())
    assert c["armguard.killswitch"]["cleanup.policy"] == "compact"
    assert c["armguard.state"]["cleanup.policy"] == "compact"
    for name in ("armguard.summaries", "armguard.deadletter", "armguard.decisions"):
        assert c[name]["cleanup.policy"] == "delete"
        assert int(c[name]["retention.ms"]) >= 7 * 86_400_000


class _Response:
    def __init__(self, errors):
        self._errors = errors

    def to_object(self):
        return {"topic_errors": self._errors}


class FakeAdmin:
    def __init__(self, existing, error_codes=None):
        self.existing = set(existing)
        self.error_codes = error_codes or {}
        self.created = []

    async def list_topics(self):
        return sorted(self.existing)

    async def describe_cluster(self):
        return {"brokers": [{"node_id": 1}, {"node_id": 2}]}

    async def create_topics(self, topics):
        self.created.extend(topics)
        return _Response(
            [
                {
                    "topic": t.name,
                    "error_code": self.error_codes.get(t.name, 0),
                    "error_message": "boom",
                }
                for t in topics
            ]
        )


async def test_ensure_topics_creates_only_the_missing_ones():
    s = Settings()
    admin = FakeAdmin({"armguard.summaries"}, {"armguard.state": 36})
    created = await ensure_topics(admin, s, partitions=3)
    assert "armguard.summaries" not in created and "armguard.state" not in created  # race lost
    assert set(created) == {
        "armguard.deadletter",
        "armguard.decisions",
        "armguard.commands",
        "armguard.killswitch",
    }
    new = {t.name: t for t in admin.created}
    assert new["armguard.killswitch"].num_partitions == 3
    assert new["armguard.killswitch"].replication_factor == 2  # min(3, brokers)
    assert new["armguard.killswitch"].topic_configs["cleanup.policy"] == "compact"
    assert await ensure_topics(FakeAdmin(set(topic_configs(s))), s) == []


async def test_ensure_topics_reports_failures_and_unknown_names():
    s = Settings()
    with pytest.raises(ArmguardError, match=r"armguard\.deadletter"):
        await ensure_topics(FakeAdmin(set(), {"armguard.deadletter": 41}), s)
    with pytest.raises(ValueError, match="not armguard topics"):
        await ensure_topics(FakeAdmin(set()), s, names=["telemetry"])
    admin = FakeAdmin(set())
    assert await ensure_topics(admin, s, names=["armguard.deadletter"], replication_factor=1) == [
        "armguard.deadletter"
    ]
