"""The platform's side of the suite: realistic events, and a producer that counts the broker's acks.

Events are `cachesync demo`'s mix (`DemoWorld`), ids tagged per fault so that no
fault's caches or relationship index meet another's, plus the odd `vendor.deleted`
(the event whose fan-out a retried batch could forget, issue 12 item 1). Each event
is stamped when it is emitted, as the platform would.

The producer is the platform's: idempotent, acks=all, and it sends an event again
when the broker did not acknowledge it (a broker that was down), so the suite counts
what the broker acknowledged, and never expects a purge of an event it did not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from bench.common import tagged
from cachesync.consumers.ops.demo import DemoWorld
from cachesync.consumers.ops.publish import event_key, new_event
from cachesync.consumers.pipeline.kafka import make_producer
from cachesync.consumers.settings import Settings
from cachesync.schemas import Codec

log = logging.getLogger(__name__)

# Avro single-object encoding starts with these two bytes; poison never does.
_SINGLE_OBJECT_MAGIC = b"\xc3\x01"


class ChaosWorld:
    """A tagged DemoWorld that also deletes a vendor now and then."""

    def __init__(self, tag: str, *, weddings: int, seed: int, vendor_deletes: float = 0.02) -> None:
        self.tag = tag
        self.demo = DemoWorld(weddings=weddings, vendors=weddings * 2, seed=seed)
        self.vendor_deletes = vendor_deletes
        self._opening = list(self.demo.opening_events())

    def next_event(self) -> tuple[str, dict[str, Any]]:
        if self._opening:
            event_type, record = self._opening.pop(0)
        elif self.demo.rng.random() < self.vendor_deletes and (deleted := self._delete_vendor()):
            event_type, record = deleted
        else:
            event_type, record = self.demo.next_event()
        record = {k: tagged(v, self.tag) for k, v in record.items()}
        record["occurred_at"] = int(time.time() * 1000)
        return event_type, record

    def _delete_vendor(self) -> tuple[str, dict[str, Any]] | None:
        """A vendor leaves: only one whose weddings all keep three others (the demo needs some)."""
        demo = self.demo
        served = [w for w in demo.weddings if w.vendors]
        if not served:
            return None
        wedding = demo.rng.choice(served)
        for vendor in sorted(wedding.vendors):
            weddings = [w for w in demo.weddings if vendor in w.vendors]
            if all(len(w.vendors) > 3 for w in weddings):
                for w in weddings:
                    w.vendors.discard(vendor)
                del demo.vendors[vendor]
                return "vendor.deleted", new_event("vendor.deleted", vendor_id=vendor)
        return None


@dataclass
class Sent:
    """One message the suite produced, and what the broker said."""

    topic: str
    key: bytes
    value: bytes
    event_id: str | None  # None for poison
    acked: bool = False
    attempts: int = 0
    error: str = ""


@dataclass
class Delivery:
    """What one fault's stream sent: every message, acked or not."""

    sent: list[Sent] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def events_acked(self) -> int:
        return sum(1 for s in self.sent if s.event_id is not None and s.acked)

    def events_sent(self) -> int:
        return sum(1 for s in self.sent if s.event_id is not None)

    def poison(self) -> list[Sent]:
        return [s for s in self.sent if s.event_id is None]

    def resends(self) -> int:
        return sum(max(0, s.attempts - 1) for s in self.sent)

    def unacked_event_ids(self) -> set[str]:
        return {s.event_id for s in self.sent if s.event_id is not None and not s.acked}


class Producer:
    """The platform's producer: every send retried until the broker acknowledges it."""

    def __init__(self, settings: Settings, codec: Codec, *, attempts: int = 8) -> None:
        self.settings = settings
        self.codec = codec
        self.attempts = attempts
        self.producer: AIOKafkaProducer = make_producer(
            settings.kafka_bootstrap_servers,
            client_id="chaos-platform",
            request_timeout_ms=30_000,
            linger_ms=5,
        )
        self._rng = random.Random(99)

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    def topic_for(self, event_type: str) -> str:
        return self.settings.topic(self.settings.topology.content_topic_for(event_type).name)

    def encode(self, event_type: str, record: dict[str, Any]) -> bytes:
        return self.codec.encode(event_type, record)

    def send_event(
        self, delivery: Delivery, event_type: str, record: dict[str, Any], value: bytes
    ) -> Sent:
        sent = Sent(
            self.topic_for(event_type),
            event_key(event_type, record),
            value,
            str(record["event_id"]),
        )
        self._deliver(delivery, sent)
        return sent

    def send_poison(self, delivery: Delivery) -> Sent:
        """Undecodable bytes on a content topic, as a broken producer would send them."""
        value = os.urandom(self._rng.randint(16, 200))
        while value.startswith(_SINGLE_OBJECT_MAGIC):
            value = os.urandom(len(value))
        topic = self._rng.choice(self.settings.content_topics)
        sent = Sent(topic, f"poison-{self._rng.randrange(1 << 30)}".encode(), value, None)
        self._deliver(delivery, sent)
        return sent

    def _deliver(self, delivery: Delivery, sent: Sent) -> None:
        delivery.sent.append(sent)
        task = asyncio.create_task(self._until_acked(sent))
        delivery.tasks.add(task)
        task.add_done_callback(delivery.tasks.discard)

    async def _until_acked(self, sent: Sent) -> None:
        while sent.attempts < self.attempts:
            sent.attempts += 1
            try:
                fut = await self.producer.send(sent.topic, value=sent.value, key=sent.key)
                await fut
            except KafkaError as exc:
                sent.error = f"{type(exc).__name__}: {exc}"[:300]
                await asyncio.sleep(1.0)
                continue
            sent.acked = True
            return
        log.warning("not acknowledged after %d attempts: %s", sent.attempts, sent.error)
