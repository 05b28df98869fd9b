"""What an operator tool opens: the wire codec, the state Redis and, unless it only reads, a producer."""

from __future__ import annotations

from typing import Self

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec
from cachesync.consumers.pipeline.kafka import KafkaConnection, make_producer
from cachesync.consumers.settings import Settings


class ToolClients:
    """Opened with `async with`; closed in the reverse order, the producer flushed first."""

    def __init__(self, settings: Settings, *, client_id: str, produce: bool) -> None:
        self.settings = settings
        self.codec = codec_for(settings)
        self.state = Redis.from_url(str(settings.state_redis_url), socket_timeout=5)
        self.producer: AIOKafkaProducer | None = (
            make_producer(KafkaConnection.of(settings), client_id=client_id) if produce else None
        )

    async def __aenter__(self) -> Self:
        await start_codec(self.codec)
        if self.producer is not None:
            await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.producer is not None:
            await self.producer.stop()
        await self.state.aclose()
        await close_codec(self.codec)
