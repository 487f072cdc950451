#!/bin/bash
# Creates the demo's topics (docker-compose `kafka-init`). Idempotent. Summaries, commands and
# state are keyed by experiment and must share one partition count (evaluate checks it). The
# configurations match what `armguard run` would create itself (daemon/kafka.py topic_configs).
set -euo pipefail
BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
PARTITIONS="${PARTITIONS:-6}"
TOPICS=/opt/kafka/bin/kafka-topics.sh

until "$TOPICS" --bootstrap-server "$BOOTSTRAP" --list >/dev/null 2>&1; do
  echo "waiting for Kafka at $BOOTSTRAP"
  sleep 2
done

create() { # create NAME PARTITIONS CONFIG[,CONFIG...]
  local args=(--bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$1" --partitions "$2"
    --replication-factor 1)
  if [[ -n "${3:-}" ]]; then
    IFS=, read -ra configs <<<"$3"
    for c in "${configs[@]}"; do args+=(--config "$c"); done
  fi
  "$TOPICS" "${args[@]}"
}

# retention.ms: telemetry 3 d, summaries and commands 7 d, dead letters 14 d, decisions 365 d.
create telemetry "$PARTITIONS" cleanup.policy=delete,retention.ms=259200000
create armguard.summaries "$PARTITIONS" cleanup.policy=delete,retention.ms=604800000,max.message.bytes=8388608
create armguard.commands "$PARTITIONS" cleanup.policy=delete,retention.ms=604800000,max.message.bytes=8388608
create armguard.state "$PARTITIONS" cleanup.policy=compact,min.cleanable.dirty.ratio=0.1,max.message.bytes=8388608
create armguard.killswitch "$PARTITIONS" cleanup.policy=compact,min.cleanable.dirty.ratio=0.1,max.message.bytes=8388608
create armguard.decisions "$PARTITIONS" cleanup.policy=delete,retention.ms=31536000000,max.message.bytes=8388608
create armguard.deadletter "$PARTITIONS" cleanup.policy=delete,retention.ms=1209600000,max.message.bytes=8388608
"$TOPICS" --bootstrap-server "$BOOTSTRAP" --describe --topic 'armguard.*' | grep -v '^\s*Topic:.*Partition:' || true
