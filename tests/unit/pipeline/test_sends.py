"""BatchedSends when the broker refuses a batch for good: the offending messages are found
one by one through a renewed producer and reported; the others are acked; anything else is
a TransientError."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    TopicAuthorizationFailedError,
)

from cachesync.consumers.errors import ProduceRefused, TransientError
from cachesync.consumers.pipeline.sends import BatchedSends

LIMIT = 100  # bytes per batch the fake broker accepts


@dataclass
class FakeBatch:
    messages: list[bytes] = field(default_factory=list)

    def close(self) -> None:  # a complete batch, as BatchedSends hands it over
        pass

    def append(
        self, *, key: bytes | None, value: bytes, timestamp: int | None, headers: object
    ) -> object:
        self.messages.append(value)
        return object()


class FakeBroker:
    """One partition per topic; a batch over LIMIT bytes is refused, and, as with an
    idempotent producer, every later batch of that producer is out of sequence."""

    def __init__(self, error: Callable[[list[bytes]], Exception | None] = lambda _: None) -> None:
        self.acked: list[bytes] = []
        self.producers = 0
        self.error = error

    def producer(self) -> FakeProducer:
        self.producers += 1
        return FakeProducer(self)


class FakeProducer:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.poisoned = False

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        error = self.broker.error(batch.messages)
        if self.poisoned:
            future.set_exception(OutOfOrderSequenceNumber())
        elif error is not None:
            future.set_exception(error)
        elif sum(len(m) for m in batch.messages) > LIMIT:
            self.poisoned = True
            future.set_exception(MessageSizeTooLargeError())
        else:
            self.broker.acked += batch.messages
            future.set_result(None)
        return future


def _sends(broker: FakeBroker, *, renew: bool = True) -> BatchedSends:
    async def renewed() -> FakeProducer:
        return broker.producer()

    return BatchedSends(broker.producer(), renew=renewed if renew else None)  # type: ignore[arg-type]


async def test_a_refused_batch_is_sent_again_one_by_one_and_only_the_offender_reported() -> None:
    """Three small messages and a large one in one batch: the large one is refused, by its
    position, and the small ones are acked, in order, through a new producer."""
    broker = FakeBroker()
    sends = _sends(broker)
    for value in [b"a" * 10, b"b" * 10, b"L" * 150, b"c" * 10]:
        sends.add("t", b"k", value, [])

    with pytest.raises(ProduceRefused) as refused:
        await sends.send()

    assert list(refused.value.refused) == [2]
    assert "MessageSizeTooLargeError" in refused.value.refused[2]
    assert broker.acked == [b"a" * 10, b"b" * 10, b"c" * 10]
    assert broker.producers == 3  # the first, one after the batch refusal, one after the message


async def test_without_renew_a_refusal_is_transient() -> None:
    """A caller that cannot replace its producer (the audit log) gets a TransientError."""
    broker = FakeBroker()
    sends = _sends(broker, renew=False)
    sends.add("t", b"k", b"L" * 150, [])

    with pytest.raises(TransientError):
        await sends.send()
    assert len(sends) == 0


@pytest.mark.parametrize(
    "error",
    [KafkaConnectionError(), TopicAuthorizationFailedError()],
    ids=["connection", "authorization"],
)
async def test_an_error_that_is_no_message_fault_is_transient(error: Exception) -> None:
    """A lost connection or a refused authorization says nothing about the messages: the
    whole send is retried, nothing is reported refused."""
    broker = FakeBroker(error=lambda _: error)
    sends = _sends(broker)
    sends.add("t", b"k", b"a", [])

    with pytest.raises(TransientError) as raised:
        await sends.send()
    assert not isinstance(raised.value, ProduceRefused)
    assert broker.acked == []
