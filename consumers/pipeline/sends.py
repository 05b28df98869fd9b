"""Batched sends: messages handed to the producer as whole batches per partition."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidProducerEpoch,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    PolicyViolationError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownProducerId,
    UnsupportedForMessageFormatError,
)
from aiokafka.producer.message_accumulator import BatchBuilder

from cachesync.consumers.errors import ProduceRefused, TransientError
from cachesync.consumers.pipeline.kafka import Murmur2Partitioner

log = logging.getLogger(__name__)

# What the broker (or the client) answers when it will never take these bytes for this
# topic, however often they are sent: the message is at fault, not the cluster. Any other
# error, retriable or not (a timeout, a broker or topic not there, an authorization
# refused, a producer fenced), is the cluster's or the configuration's and says nothing
# about the message: it is transient, so the batch is retried and nothing is lost.
# `KafkaError.retriable` does not draw this line: KafkaTimeoutError is not "retriable".
REFUSALS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    PolicyViolationError,
    UnsupportedForMessageFormatError,
)

# The idempotent producer numbers each partition's batches. A batch the broker refuses
# keeps its numbers, so every later batch to that partition is out of sequence, forever:
# after a refusal (or any of these) the producer must be replaced before the next send.
_PRODUCER_STATE: tuple[type[KafkaError], ...] = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)

# Replaces the caller's producer (stopping the old one) and returns the new one.
Renew = Callable[[], Awaitable[AIOKafkaProducer]]

_Message = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]


@dataclass(frozen=True, slots=True)
class _Sent:
    """One batch handed to the producer: where, which messages (by position), its ack."""

    topic: str
    partition: int
    positions: list[int]
    future: asyncio.Future[object]


class BatchedSends:
    """Messages gathered per partition and handed to the producer as whole batches.

    `producer.send()` costs some 40 µs of Python per message; appending to a batch a few.
    The partition is the default partitioner's (murmur2 of the key), so a key lands
    where any other producer would put it, and order per partition is kept.

    A batch the broker refuses for good (`REFUSALS`) is not retried as a whole: with
    `renew`, its messages are sent again one by one through a new producer, and those
    refused alone are reported (`ProduceRefused`, by their position in the order they
    were added) while the others are acked. Without `renew` a refusal is a TransientError.
    """

    def __init__(self, producer: AIOKafkaProducer, *, renew: Renew | None = None) -> None:
        self.producer = producer
        self.renew = renew
        self.partitioner = Murmur2Partitioner()
        self._messages: list[_Message] = []

    def add(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        self._messages.append((topic, key, value, headers))

    def __len__(self) -> int:
        return len(self._messages)

    def take(self) -> list[_Message]:
        """The messages added since the last send, handed to the caller (and forgotten)."""
        messages, self._messages = self._messages, []
        return messages

    async def send(self) -> None:
        """Send everything added and wait until the broker acked it.

        TransientError if it did not ack all of it (nothing is known to be refused);
        ProduceRefused if it acked all but the messages it will never accept.
        """
        messages = self.take()
        if not messages:
            return
        try:
            sent = await self._send_batches(messages)
        except KafkaError as exc:
            raise TransientError(f"produce failed: {type(exc).__name__}: {exc}") from exc
        await asyncio.wait([s.future for s in sent])
        refused_partitions = {
            (s.topic, s.partition) for s in sent if isinstance(_error(s), REFUSALS)
        }
        again: list[int] = []  # refused, or out of sequence behind a refusal: one by one
        failure: BaseException | None = None
        for s in sent:
            error = _error(s)
            if error is None:
                continue
            if isinstance(error, REFUSALS) or (
                isinstance(error, _PRODUCER_STATE) and (s.topic, s.partition) in refused_partitions
            ):
                again += s.positions
            elif not isinstance(error, KafkaError):
                raise error
            else:
                failure = failure or error
        if failure is not None or (again and self.renew is None):
            if self.renew is not None and (again or isinstance(failure, _PRODUCER_STATE)):
                self.producer = await self.renew()
            error = failure or next(e for s in sent if (e := _error(s)) is not None)
            raise TransientError(f"produce failed: {type(error).__name__}: {error}") from error
        if again:
            refused = await self._one_by_one(messages, sorted(again))
            if refused:
                raise ProduceRefused(refused)

    async def _send_batches(self, messages: list[_Message]) -> list[_Sent]:
        partitions: dict[str, list[int]] = {}
        grouped: dict[tuple[str, int], list[int]] = {}
        for position, (topic, key, _, _) in enumerate(messages):
            if topic not in partitions:
                partitions[topic] = sorted(await self.producer.partitions_for(topic))
            known = partitions[topic]
            grouped.setdefault((topic, self.partitioner(key, known, known)), []).append(position)
        sent: list[_Sent] = []
        for (topic, partition), positions in grouped.items():
            batch = self.producer.create_batch()
            in_batch: list[int] = []
            for position in positions:
                _, key, value, headers = messages[position]
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    future = await hand_over(self.producer, batch, topic, partition)
                    sent.append(_Sent(topic, partition, in_batch, future))
                    batch, in_batch = self.producer.create_batch(), []
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
                in_batch.append(position)
            future = await hand_over(self.producer, batch, topic, partition)
            sent.append(_Sent(topic, partition, in_batch, future))
        return sent

    async def _one_by_one(self, messages: list[_Message], positions: list[int]) -> dict[int, str]:
        """Send each message alone, in order, through a new producer; the ones refused, why."""
        assert self.renew is not None
        self.producer = await self.renew()
        refused: dict[int, str] = {}
        for position in positions:
            topic, key, value, headers = messages[position]
            try:
                partitions = sorted(await self.producer.partitions_for(topic))
                batch = self.producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=headers)
                partition = self.partitioner(key, partitions, partitions)
                await (await hand_over(self.producer, batch, topic, partition))
            except REFUSALS as exc:
                refused[position] = f"{topic}: {type(exc).__name__}: {len(value)} bytes refused"
                log.warning("the broker refused a message for good: %s", refused[position])
                self.producer = await self.renew()
            except KafkaError as exc:
                if isinstance(exc, _PRODUCER_STATE):
                    self.producer = await self.renew()
                raise TransientError(f"produce failed: {type(exc).__name__}: {exc}") from exc
        return refused


async def hand_over(
    producer: AIOKafkaProducer, batch: BatchBuilder, topic: str, partition: int
) -> asyncio.Future[object]:
    """Hand a whole batch to the producer, to go out at its next send; its ack's future.

    The batch is closed first: aiokafka holds an open batch for `linger_ms` in case more
    messages come (through `send`), which costs every wait for an ack the whole linger
    (5 ms of a 6 ms ack on the local broker). A batch built here is complete when handed
    over, so waiting for more only delays it.
    """
    batch.close()
    future: asyncio.Future[object] = await producer.send_batch(batch, topic, partition=partition)
    return future


def ack_error(future: asyncio.Future[object], what: str) -> BaseException | None:
    """Why the producer did not ack a send (done) of `what`; None if it did. A send the
    producer was closed under is cancelled: a KafkaError."""
    if future.cancelled():
        cancelled: BaseException = KafkaError(f"{what} cancelled")
        return cancelled
    return future.exception()


def _error(sent: _Sent) -> BaseException | None:
    return ack_error(sent.future, f"batch to {sent.topic}[{sent.partition}]")
