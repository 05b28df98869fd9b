"""The dead-letter topic: where a record that can never be processed goes, with why."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from cachesync.consumers import telemetry
from cachesync.consumers.errors import BadInput, DeadLetterUnavailable, PermanentSinkError
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.kafka import Cluster, Record, make_producer

log = logging.getLogger(__name__)

# A record too large for the dead-letter topic keeps this much of its value, its key up
# to KEPT_KEY_BYTES, and its own headers if they come to at most KEPT_HEADER_BYTES.
KEPT_VALUE_BYTES = 64 * 1024
KEPT_KEY_BYTES = 1024
KEPT_HEADER_BYTES = 8 * 1024

# The broker (or the client, for its max_request_size) refuses the record for its size.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)

_Headers = list[tuple[str, bytes]]


class DeadLetters:
    """Sends a record that can never be processed to the dead-letter topic, with why.

    A failed write is a `DeadLetterUnavailable` (transient): the loop puts the batch back
    and commits nothing, so the record is dead-lettered on a later try, never lost, and
    no role stops. That needs a producer of its own, not the role's: without idempotence
    and with a short request timeout, a dead-letter topic that is down or deleted fails
    the send within `timeout_s` (the role's idempotent producer would retry it forever,
    holding the role and its shutdown), and a record the broker refuses for its size
    does not put a producer's sequence numbers out of step for everything after it.
    It starts on the first dead letter; most roles never send one.

    A record too large for the topic with the `dlq.*` headers is kept as its origin
    (those headers), the first KEPT_VALUE_BYTES of its value and the reason, marked
    `dlq.truncated` with its original size in `dlq.original_bytes`.
    """

    def __init__(
        self,
        cluster: Cluster,
        topic: str,
        consumer: str,
        *,
        timeout_s: float = 5.0,
        producer: AIOKafkaProducer | None = None,
    ) -> None:
        self.cluster = cluster
        self.topic = topic
        self.consumer = consumer
        self.timeout_s = timeout_s
        self._producer = producer
        self._started = False
        # A send that timed out may still land: its retry waits for it instead of
        # writing a second copy. Keyed by the record's origin.
        self._pending: dict[tuple[str, int, int], asyncio.Future[object]] = {}

    async def send(self, record: Record, error: BadInput | PermanentSinkError) -> None:
        """Dead-letter `record`; DeadLetterUnavailable if the topic did not take it."""
        reason = getattr(error, "reason", "permanent")
        dlq = [
            (headers.DLQ_REASON, reason.encode()),
            (headers.DLQ_ERROR, str(error)[:2000].encode()),
            (headers.DLQ_CONSUMER, self.consumer.encode()),
            (headers.DLQ_TOPIC, record.topic.encode()),
            (headers.DLQ_PARTITION, str(record.partition).encode()),
            (headers.DLQ_OFFSET, str(record.offset).encode()),
            (headers.DLQ_TIMESTAMP, str(record.timestamp).encode()),
        ]
        origin = (record.topic, record.partition, record.offset)
        truncated = False
        try:
            await self._write(origin, record.key, record.value, [*(record.headers or ()), *dlq])
        except _TOO_LARGE:
            truncated = True
            await self._write(origin, *_truncated(record, dlq))
        telemetry.dead_lettered.add(1, {"reason": reason, "consumer": self.consumer})
        log.warning(
            "dead-lettered %s[%d]@%d%s: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            f" (truncated, {len(record.value or b'')} bytes)" if truncated else "",
            reason,
            error,
        )

    async def _write(
        self, origin: tuple[str, int, int], key: bytes | None, value: bytes | None, hdrs: _Headers
    ) -> None:
        """One write, acked within timeout_s; a size refusal escapes as itself."""
        fut = self._pending.get(origin)
        try:
            if fut is None:
                producer = await self._started_producer()
                sent: asyncio.Future[object] = await asyncio.wait_for(
                    producer.send(self.topic, value=value, key=key, headers=hdrs), self.timeout_s
                )
                fut = self._pending[origin] = sent
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except _TOO_LARGE:
            self._pending.pop(origin, None)
            raise
        except (KafkaError, TimeoutError) as exc:
            if fut is not None and fut.done():
                self._pending.pop(origin, None)  # failed for good: the retry sends again
            raise DeadLetterUnavailable(
                f"dead-letter topic {self.topic}: {type(exc).__name__}: {exc}"
            ) from exc
        self._pending.pop(origin, None)

    async def _started_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._producer = make_producer(
                self.cluster,
                client_id=f"cachesync-{self.consumer}-dlq",
                enable_idempotence=False,
                request_timeout_ms=int(self.timeout_s * 1000),
                linger_ms=0,
            )
        if not self._started:
            try:
                await self._producer.start()
            except BaseException:
                producer, self._producer = self._producer, None
                try:
                    await producer.stop()
                except Exception:  # it never started: nothing of ours to lose
                    log.debug("dead-letter producer: stop after a failed start", exc_info=True)
                raise
            self._started = True
        return self._producer

    async def close(self) -> None:
        """Stop the producer, if one was started (pending writes get timeout_s to land)."""
        if self._producer is not None and self._started:
            self._started = False
            await self._producer.stop()


def _truncated(record: Record, dlq: _Headers) -> tuple[bytes | None, bytes, _Headers]:
    """Key, value and headers of a record cut down to fit: origin, reason, a prefix."""
    value = record.value or b""
    own = list(record.headers or ())
    if sum(len(k) + len(v) for k, v in own) > KEPT_HEADER_BYTES:
        own = []
    key = record.key[:KEPT_KEY_BYTES] if record.key is not None else None
    marks = [
        (headers.DLQ_TRUNCATED, b"true"),
        (headers.DLQ_ORIGINAL_BYTES, str(len(value)).encode()),
    ]
    return key, value[:KEPT_VALUE_BYTES], [*own, *dlq, *marks]
