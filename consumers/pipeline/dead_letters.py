"""The dead-letter topic: where a record that can never be processed goes, with why."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer

from cachesync.consumers import telemetry
from cachesync.consumers.errors import BadInput, PermanentSinkError
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.kafka import Record

log = logging.getLogger(__name__)


class DeadLetters:
    """Sends a record that can never be processed to the dead-letter topic, with why."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, consumer: str) -> None:
        self.producer = producer
        self.topic = topic
        self.consumer = consumer

    async def send(self, record: Record, error: BadInput | PermanentSinkError) -> None:
        reason = getattr(error, "reason", "permanent")
        extra = [
            *(record.headers or ()),
            (headers.DLQ_REASON, reason.encode()),
            (headers.DLQ_ERROR, str(error)[:2000].encode()),
            (headers.DLQ_CONSUMER, self.consumer.encode()),
            (headers.DLQ_TOPIC, record.topic.encode()),
            (headers.DLQ_PARTITION, str(record.partition).encode()),
            (headers.DLQ_OFFSET, str(record.offset).encode()),
            (headers.DLQ_TIMESTAMP, str(record.timestamp).encode()),
        ]
        fut = await self.producer.send(
            self.topic, value=record.value, key=record.key, headers=extra
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
