"""DeadLetters with a fake producer: a failed write is transient, a timed-out one is not
written twice, and a record too large for the topic is kept truncated with its origin."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from cachesync.consumers.errors import DeadLetterUnavailable, Undecodable
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.dead_letters import KEPT_VALUE_BYTES, DeadLetters
from cachesync.consumers.pipeline.kafka import Record

LIMIT = 1_000_000


def record(value: bytes, *, offset: int = 7) -> Record:
    return ConsumerRecord(
        topic="content.photos",
        partition=2,
        offset=offset,
        timestamp=1_764_000_000_000,
        timestamp_type=0,
        key=b"w1",
        value=value,
        checksum=None,
        serialized_key_size=2,
        serialized_value_size=len(value),
        headers=[("traceparent", b"00-abc-def-01")],
    )


class FakeProducer:
    """Takes records up to LIMIT bytes of value; `outcome` decides each write's ack."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes, dict[str, bytes]]] = []
        self.outcome: asyncio.Future[object] | Exception | None = None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(
        self, topic: str, *, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[object]:
        if len(value) > LIMIT:
            raise MessageSizeTooLargeError()
        self.sent.append((key, value, dict(headers)))
        if isinstance(self.outcome, asyncio.Future):
            return self.outcome
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if isinstance(self.outcome, Exception):
            future.set_exception(self.outcome)
        else:
            future.set_result(None)
        return future


def dead_letters(producer: FakeProducer, timeout_s: float = 0.2) -> DeadLetters:
    return DeadLetters(
        "unused:9092",
        "cache.dlq",
        "mapper",
        timeout_s=timeout_s,
        producer=producer,  # type: ignore[arg-type]
    )


async def test_a_record_is_dead_lettered_whole_with_its_origin_and_reason() -> None:
    """Value, key and headers kept; the dlq.* headers say where it came from and why."""
    producer = FakeProducer()

    await dead_letters(producer).send(record(b"junk"), Undecodable("not avro"))

    [(key, value, hdrs)] = producer.sent
    assert (key, value) == (b"w1", b"junk")
    assert hdrs["traceparent"] == b"00-abc-def-01"
    assert hdrs[headers.DLQ_REASON] == b"undecodable"
    assert (hdrs[headers.DLQ_TOPIC], hdrs[headers.DLQ_PARTITION], hdrs[headers.DLQ_OFFSET]) == (
        b"content.photos",
        b"2",
        b"7",
    )
    assert headers.DLQ_TRUNCATED not in hdrs


async def test_a_record_too_large_for_the_topic_is_kept_as_a_prefix_with_its_size() -> None:
    """Over the limit: the first 64 KiB, the origin, the reason, dlq.truncated and the size."""
    producer = FakeProducer()
    big = b"x" * (LIMIT + 1)

    await dead_letters(producer).send(record(big), Undecodable("not avro"))

    [(key, value, hdrs)] = producer.sent
    assert value == big[:KEPT_VALUE_BYTES]
    assert key == b"w1"
    assert hdrs[headers.DLQ_TRUNCATED] == b"true"
    assert hdrs[headers.DLQ_ORIGINAL_BYTES] == str(len(big)).encode()
    assert hdrs[headers.DLQ_OFFSET] == b"7" and hdrs[headers.DLQ_REASON] == b"undecodable"


async def test_a_failed_write_is_transient() -> None:
    """The topic did not take it: DeadLetterUnavailable, a TransientError (batch put back)."""
    producer = FakeProducer()
    producer.outcome = KafkaTimeoutError()

    with pytest.raises(DeadLetterUnavailable):
        await dead_letters(producer).send(record(b"junk"), Undecodable("not avro"))


async def test_a_write_that_timed_out_is_awaited_again_not_sent_twice() -> None:
    """No ack within the timeout: transient; the retry waits for the same write, which lands."""
    producer = FakeProducer()
    ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    producer.outcome = ack
    letters = dead_letters(producer, timeout_s=0.05)

    with pytest.raises(DeadLetterUnavailable):
        await letters.send(record(b"junk"), Undecodable("not avro"))
    ack.set_result(None)
    await letters.send(record(b"junk"), Undecodable("not avro"))

    assert len(producer.sent) == 1
