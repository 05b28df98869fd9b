"""Kafka plumbing: client factories, the commit-after-effect loop, the dead-letter producer.

The loop is the project's at-least-once guarantee: offsets of a batch are committed
only after its handler returned, i.e. after every command was acked by the broker
(mapper) or applied to the cache (sinks). A `TransientError` puts the batch back:
its partitions are sought to the batch start and paused until the backoff (or the
provider's Retry-After) passes, so the process keeps serving other partitions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from cachesync.consumers import telemetry
from cachesync.consumers.errors import BadInput, PermanentSinkError, RetryAfter, TransientError

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
BatchHandler = Callable[[list[Record]], Awaitable[None]]


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


def header(record: Record, name: str) -> bytes | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value)
    return None


class DeadLetters:
    """Sends a record that can never be processed to the dead-letter topic, with why."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, consumer: str) -> None:
        self.producer = producer
        self.topic = topic
        self.consumer = consumer

    async def send(self, record: Record, error: BadInput | PermanentSinkError) -> None:
        reason = getattr(error, "reason", "permanent")
        headers = [
            *(record.headers or ()),
            ("dlq.reason", reason.encode()),
            ("dlq.error", str(error)[:2000].encode()),
            ("dlq.consumer", self.consumer.encode()),
            ("dlq.topic", record.topic.encode()),
            ("dlq.partition", str(record.partition).encode()),
            ("dlq.offset", str(record.offset).encode()),
            ("dlq.timestamp", str(record.timestamp).encode()),
        ]
        fut = await self.producer.send(
            self.topic, value=record.value, key=record.key, headers=headers
        )
        await fut
        telemetry.dead_lettered.add(1, {"reason": reason, "consumer": self.consumer})
        log.warning(
            "dead-lettered %s[%d]@%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            error,
        )


@dataclass
class Backoff:
    """Exponential backoff with full jitter for putting a batch back."""

    base: float = 0.2
    cap: float = 30.0
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        self.failures += 1
        return (
            self.rng.uniform(0, min(self.cap, self.base * 2 ** (self.failures - 1))) + self.base / 2
        )

    def reset(self) -> None:
        self.failures = 0


class CommitAfterEffect:
    """consume a batch -> handler -> commit; on TransientError pause, seek back, retry."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        handler: BatchHandler,
        *,
        name: str,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        backoff: Backoff | None = None,
        linger_ms: int = 0,
        group: str | None = None,
    ) -> None:
        self.consumer = consumer
        self.group = group
        self.handler = handler
        self.name = name
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.backoff = backoff or Backoff()
        # After the first records of a batch arrive, keep polling this long (up to
        # max_records) so that one handler call sees a whole coalescing window.
        self.linger_ms = linger_ms
        self._paused_until: dict[TopicPartition, float] = {}
        self._lag_observed_at = 0.0
        self.batches_committed = 0
        self.records_committed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until `stop` is set; the batch in hand is finished and committed first."""
        while not stop.is_set():
            self._resume_due()
            await self._observe_lag()
            batch = await self.consumer.getmany(
                timeout_ms=self.poll_timeout_ms, max_records=self.max_records
            )
            if not batch:
                continue
            if self.linger_ms > 0:
                batch = await self._linger(batch, stop)
            await self.process(batch)

    async def _linger(
        self, batch: dict[TopicPartition, list[Record]], stop: asyncio.Event
    ) -> dict[TopicPartition, list[Record]]:
        merged = {tp: list(part) for tp, part in batch.items()}
        count = sum(len(p) for p in merged.values())
        deadline = time.monotonic() + self.linger_ms / 1000
        while count < self.max_records and not stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = await self.consumer.getmany(
                timeout_ms=min(left_ms, self.poll_timeout_ms),
                max_records=self.max_records - count,
            )
            for tp, part in more.items():
                merged.setdefault(tp, []).extend(part)
                count += len(part)
        return merged

    async def process(self, batch: dict[TopicPartition, list[Record]]) -> bool:
        records = [r for part in batch.values() for r in part]
        try:
            await self.handler(records)
        except TransientError as exc:
            delay = exc.retry_after if isinstance(exc, RetryAfter) else self.backoff.next_delay()
            self._put_back(batch, delay)
            telemetry.retries.add(1, {"consumer": self.name, "reason": type(exc).__name__})
            # A provider's Retry-After or a tier not yet applied is flow control, counted by
            # the retries metric; a failure (a Redis or an API down) is worth a warning.
            level = logging.DEBUG if isinstance(exc, RetryAfter) else logging.WARNING
            log.log(
                level, "%s: batch of %d put back for %.2fs: %s", self.name, len(records), delay, exc
            )
            return False
        self.backoff.reset()
        await self._commit(batch)
        return True

    @property
    def paused(self) -> set[TopicPartition]:
        """Partitions whose batch was put back and waits for its retry time."""
        return set(self._paused_until)

    async def _observe_lag(self) -> None:
        """Consumer lag per partition (high-water mark minus position), at most once a second."""
        now = time.monotonic()
        if now - self._lag_observed_at < 1.0:
            return
        self._lag_observed_at = now
        group = self.group or self.name
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            position = await self.consumer.position(tp)
            telemetry.record_lag(group, tp.topic, tp.partition, max(0, highwater - position))

    def _put_back(self, batch: dict[TopicPartition, list[Record]], delay: float) -> None:
        until = time.monotonic() + delay
        for tp, part in batch.items():
            if not part:
                continue
            self.consumer.seek(tp, part[0].offset)
            self._paused_until[tp] = until
        self.consumer.pause(*batch.keys())

    def _resume_due(self) -> None:
        if not self._paused_until:
            return
        now = time.monotonic()
        due = [tp for tp, until in self._paused_until.items() if until <= now]
        for tp in due:
            del self._paused_until[tp]
        assigned = self.consumer.assignment()
        due = [tp for tp in due if tp in assigned]
        if due:
            self.consumer.resume(*due)

    async def _commit(self, batch: dict[TopicPartition, list[Record]]) -> None:
        offsets = {tp: part[-1].offset + 1 for tp, part in batch.items() if part}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance took the partitions away mid-batch: the new owner re-reads
            # from the last commit and applies again, which is harmless by design.
            log.warning("%s: commit skipped after rebalance: %s", self.name, exc)
            return
        except KafkaError as exc:
            log.warning("%s: commit failed, batch will be re-read: %s", self.name, exc)
            return
        self.batches_committed += 1
        self.records_committed += sum(len(p) for p in batch.values())


class BatchedSends:
    """Messages gathered per partition and handed to the producer as whole batches.

    `producer.send()` costs some 40 µs of Python per message; appending to a batch a few.
    The partition is the default partitioner's (murmur2 of the key), so a key lands
    where any other producer would put it, and order per partition is kept.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.partitioner = CachedPartitioner()
        self._messages: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []

    def add(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        self._messages.append((topic, key, value, headers))

    def __len__(self) -> int:
        return len(self._messages)

    async def send(self) -> None:
        """Send everything added and wait until the broker acked it (TransientError if not)."""
        messages, self._messages = self._messages, []
        if not messages:
            return
        try:
            partitions: dict[str, list[int]] = {}
            grouped: dict[
                tuple[str, int], list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]
            ] = {}
            for topic, key, value, headers in messages:
                if topic not in partitions:
                    partitions[topic] = sorted(await self.producer.partitions_for(topic))
                known = partitions[topic]
                partition = self.partitioner(key, known, known)
                grouped.setdefault((topic, partition), []).append((key, value, headers))
            futures = []
            for (topic, partition), items in grouped.items():
                batch = self.producer.create_batch()
                for key, value, headers in items:
                    if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        futures.append(
                            await self.producer.send_batch(batch, topic, partition=partition)
                        )
                        batch = self.producer.create_batch()
                        batch.append(key=key, value=value, timestamp=None, headers=headers)
                futures.append(await self.producer.send_batch(batch, topic, partition=partition))
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise TransientError(f"produce failed: {type(exc).__name__}: {exc}") from exc
