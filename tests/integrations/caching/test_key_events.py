"""The effectiveness recorder's Redis key events: the platform's writes and misses, never
cachesync's own markers, which Redis itself leaves out (keyspace channel patterns)."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis

from cachesync.consumers.ops.effectiveness.recorder import RedisKeyEvents
from cachesync.consumers.settings import Settings
from tests.helpers import eventually


async def test_key_events_bring_the_platforms_fills_and_misses_and_not_cachesyncs_keys(
    settings: Settings, region_redis: dict[str, Redis]
) -> None:
    redis = region_redis["eu-west"]
    events = RedisKeyEvents("eu-west", settings.region_redis_urls["eu-west"], enable=True)
    stop = asyncio.Event()
    task = asyncio.create_task(events.run(stop))
    run = uuid.uuid4().hex[:8]
    try:
        await eventually(lambda: events.listening, within=10, what="listening")
        await redis.set(f"cachesync:applied:redis:{run}", 1, ex=60)
        await redis.set(f"cachesync{run}", 1, ex=60)  # not cachesync's prefix: the platform's
        await redis.set(f"photo:{run}", b"jpeg", ex=60)
        await redis.get(f"photo:{run}-absent")
        await redis.set(f"cachesync:done:{run}", 1, ex=60)
        await redis.set(f"photo:{run}-last", b"jpeg", ex=60)

        async def seen_last() -> bool:
            return any(r.resource == f"photo:{run}-last" for r in events.rows)

        await eventually(seen_last, within=10, what="the last platform write")
    finally:
        stop.set()
        await task
    mine = [(r.resource, r.outcome) for r in events.drain() if run in r.resource]
    assert mine == [
        (f"cachesync{run}", "fill"),
        (f"photo:{run}", "fill"),
        (f"photo:{run}-absent", "miss"),
        (f"photo:{run}-last", "fill"),
    ]
