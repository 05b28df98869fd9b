"""Producing platform events: the envelope, the encoding, and the topic each type lives on.

The platform's services do this in production; cachesync uses it for the demo, the
tests and the benchmarks, so they all put exactly what the platform would on the wire.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer

from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec
from cachesync.consumers.pipeline.kafka import make_producer
from cachesync.consumers.settings import Settings
from cachesync.schemas import Codec

# The field that keys each event type's topic, so one entity's events stay in order.
_KEY_FIELD = {
    "photo": "wedding_id",
    "album": "wedding_id",
    "wedding": "wedding_id",
    "guest_portal": "wedding_id",
    "vendor": "vendor_id",
    "vendor_api": "vendor_id",
}


def new_event(
    event_type: str,
    *,
    source: str = "demo",
    occurred_at: int | None = None,
    event_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """An event record with its envelope filled in."""
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "occurred_at": occurred_at if occurred_at is not None else int(time.time() * 1000),
        "source": source,
        "schema_version": 1,
        **fields,
    }


def event_key(event_type: str, record: dict[str, Any]) -> bytes:
    entity = event_type.split(".", 1)[0]
    if event_type in ("vendor.linked", "vendor.unlinked"):
        # Keyed by vendor: a vendor's links and its updates must stay in order.
        return str(record["vendor_id"]).encode()
    return str(record[_KEY_FIELD[entity]]).encode()


class EventPublisher:
    def __init__(
        self,
        settings: Settings,
        *,
        producer: AIOKafkaProducer | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec or codec_for(settings)
        self.producer = producer or make_producer(
            settings.kafka_bootstrap_servers, client_id="cachesync-publisher"
        )
        self._own_producer = producer is None

    async def start(self) -> None:
        await start_codec(self.codec)
        if self._own_producer:
            await self.producer.start()

    async def stop(self) -> None:
        if self._own_producer:
            await self.producer.stop()
        await close_codec(self.codec)

    def topic_for(self, event_type: str) -> str:
        return self.settings.topic(self.settings.topology.content_topic_for(event_type).name)

    async def publish(
        self,
        event_type: str,
        record: dict[str, Any],
        *,
        headers: list[tuple[str, bytes]] | None = None,
        wait: bool = True,
    ) -> None:
        value = self.codec.encode(event_type, record)
        fut = await self.producer.send(
            self.topic_for(event_type),
            value=value,
            key=event_key(event_type, record),
            headers=headers or [],
        )
        if wait:
            await fut

    async def publish_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await (await self.producer.send(topic, value=value, key=key))

    async def flush(self) -> None:
        await self.producer.flush()
