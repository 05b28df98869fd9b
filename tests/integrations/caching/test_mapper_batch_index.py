"""The mapper's per-batch index view gives the commands and index the per-event one does."""

from __future__ import annotations

import uuid
from typing import Any

from redis.asyncio import Redis

from bench.common import World
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import Mapper
from cachesync.consumers.ops.publish import new_event
from cachesync.consumers.settings import Settings

T0 = 1_764_000_000.0


def _events(tag: str) -> list[tuple[str, dict[str, Any]]]:
    events = World(tag, weddings=12, seed=3).events(400)
    # A vendor deleted mid-stream, then updated and linked again: forget, fan out to
    # nobody, link anew, all within one batch.
    vendor = next(r["vendor_id"] for t, r in events if t == "vendor.linked")
    wedding = next(r["wedding_id"] for t, r in events if t == "wedding.published")
    extra = [
        ("vendor.deleted", new_event("vendor.deleted", vendor_id=vendor)),
        (
            "vendor.updated",
            new_event("vendor.updated", vendor_id=vendor, category="band", changed_fields=["bio"]),
        ),
        (
            "vendor.linked",
            new_event("vendor.linked", vendor_id=vendor, wedding_id=wedding, role="band"),
        ),
        (
            "vendor.updated",
            new_event("vendor.updated", vendor_id=vendor, category="band", changed_fields=["bio"]),
        ),
    ]
    return events[:200] + extra + events[200:]


async def _index_state(redis: Redis, tag: str) -> dict[str, set[bytes]]:
    keys = [k async for k in redis.scan_iter(match=f"cachesync:rel:*{tag}*", count=1000)]
    return {k.decode(): await redis.smembers(k) for k in keys}


async def _clear(redis: Redis, tag: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"*{tag}*", count=1000)]
    if keys:
        await redis.delete(*keys)


async def test_batch_index_maps_like_the_per_event_index(settings: Settings) -> None:
    tag = uuid.uuid4().hex[:8]
    events = _events(tag)
    redis = Redis.from_url(str(settings.state_redis_url))
    mapper = Mapper(
        settings.topology, RelationshipIndex(redis, settings.topology), clock=lambda: T0
    )
    try:
        per_event = [await mapper.map_event(t, r) for t, r in events]
        state_per_event = await _index_state(redis, tag)
        await _clear(redis, tag)

        batched: list[Any] = []
        for start in range(0, len(events), 97):
            chunk = events[start : start + 97]
            view = mapper.index.batch()
            await view.prefetch(*mapper.index_ids(chunk))
            batched += [await mapper.map_event(t, r, index=view) for t, r in chunk]
            await view.flush()
        state_batched = await _index_state(redis, tag)
    finally:
        await _clear(redis, tag)
        await redis.aclose()

    assert batched == per_event
    assert state_batched == state_per_event
    assert any(cmd.kind == "warm" for cmds in batched for cmd in cmds)
