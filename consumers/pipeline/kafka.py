"""Kafka clients as every role makes them: producer and consumer settings, partition lookup.

Producers are idempotent with acks=all (a retried send is never a duplicate), and
consumers never auto-commit: the commit-after-effect loop (`loop.py`) owns commits.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner, murmur2

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


class CachedPartitioner:
    """The default partitioner's choice (murmur2 of the key, as every Kafka client makes
    it, so other producers agree), memoized per key: entity keys repeat, and aiokafka's
    murmur2 is pure Python."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= self.max_keys:
                self._hashes.clear()
            h = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[h % len(all_partitions)]


def make_producer(bootstrap_servers: str, *, client_id: str, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "max_request_size": 2 * 1024 * 1024,
        "partitioner": CachedPartitioner(),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    bootstrap_servers: str, *topics: str, group_id: str, client_id: str, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "group_id": group_id,
        "client_id": client_id,
        "enable_auto_commit": False,
        # A new group starts at the beginning: losing events is worse than re-purging.
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 2 * 1024 * 1024,
        "fetch_max_wait_ms": 100,
        "session_timeout_ms": 15000,
        "heartbeat_interval_ms": 3000,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def partitions_of(bootstrap_servers: str, topics: list[str]) -> list[TopicPartition]:
    """Every partition of the given topics, from the cluster's metadata."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="cachesync-meta")
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return sorted(
        (TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]),
        key=lambda tp: (tp.topic, tp.partition),
    )
