"""Tier order within a region: the edge purges only after the region's Redis has."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from cachesync.consumers import keys
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.registry import build_sink
from tests.helpers import eventually

EU = "eu-west"


async def test_edge_waits_for_redis_then_purges(
    settings: Settings, topics: list[str], edge: str, run_roles_bg, region_redis
) -> None:
    """With eu-west's Redis sink not running, its edge holds the purge; once Redis applies, the edge follows."""
    run = uuid.uuid4().hex[:8]
    wedding = f"w-{run}"
    page = f"/weddings/{wedding}/gallery"
    group = settings.model_copy(update={"group_prefix": f"{settings.group_prefix}-tiers-{run}"})
    assert group.region_edge_urls[EU] == edge, "the topology's eu-west edge is the test's Varnish"
    http_purge = build_sink(group, EU, "http_purge")
    assert http_purge.after == ("redis",)
    edge_role = SinkRole(group, http_purge, auto_offset_reset="latest")
    await run_roles_bg([MapperRole(settings), edge_role])
    async with httpx.AsyncClient(base_url=edge) as http:
        await http.get(page)
        assert (await http.get(page)).headers["X-Cache"] == "HIT"
        event = new_event(
            "photo.uploaded",
            wedding_id=wedding,
            photo_id="p1",
            album_id=None,
            path=f"/weddings/{wedding}/photos/p1.jpg",
            content_type="image/jpeg",
            size_bytes=1,
        )
        pub = EventPublisher(settings)
        await pub.start()
        try:
            await pub.publish("photo.uploaded", event)
        finally:
            await pub.stop()
        # The edge sees the command but holds it: Redis has not applied this event here.
        await eventually(lambda: _retried(edge_role), what="the edge never held a batch back")
        assert (await http.get(page)).headers["X-Cache"] == "HIT", "edge purged before Redis"
        assert not await region_redis[EU].exists(
            keys.applied_event("http_purge", event["event_id"])
        )

        redis_role = SinkRole(group, build_sink(group, EU, "redis"), auto_offset_reset="earliest")
        await run_roles_bg([redis_role])

        async def edge_purged() -> bool:
            return bool(
                await region_redis[EU].exists(keys.applied_event("http_purge", event["event_id"]))
            )

        await eventually(edge_purged, what="the edge never purged after Redis applied")
        assert await region_redis[EU].exists(keys.applied_event("redis", event["event_id"]))
        assert (await http.get(page)).headers["X-Cache"] == "MISS"


async def _retried(role: SinkRole) -> bool:
    await asyncio.sleep(0)
    return bool(role.held_events)
