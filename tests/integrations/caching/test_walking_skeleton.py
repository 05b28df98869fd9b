"""One photo.uploaded event through real Kafka and real Redis in three regions."""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from tests.helpers import eventually


async def test_photo_uploaded_purges_every_region(
    settings: Settings, topics: list[str], region_redis: dict[str, Redis], run_roles_bg
) -> None:
    """The wedding's gallery, the album and every key tagged with the wedding's photos go, in all regions."""
    wedding, photo, album = (f"{p}-{uuid.uuid4().hex[:8]}" for p in ("w", "ph", "a"))
    older_photo = f"ph-{uuid.uuid4().hex[:8]}"
    doomed = [f"wedding:{wedding}:gallery", f"wedding:{wedding}:album:{album}", f"photo:{photo}"]
    tagged = f"photo:{older_photo}"  # only reachable through the tag index
    bystander = f"wedding:{wedding}:details"  # photo.uploaded must not touch it
    for redis in region_redis.values():
        for key in doomed:
            await cache_put(redis, key, b"stale")
        await cache_put(redis, tagged, b"stale", tags=[f"wedding:{wedding}:photos"])
        await cache_put(redis, bystander, b"fresh")

    sinks = [SinkRole(settings, RedisSink(r, u)) for r, u in settings.region_redis_urls.items()]
    await run_roles_bg([MapperRole(settings), *sinks])

    publisher = EventPublisher(settings)
    await publisher.start()
    try:
        await publisher.publish(
            "photo.uploaded",
            new_event(
                "photo.uploaded",
                wedding_id=wedding,
                photo_id=photo,
                album_id=album,
                path=f"/weddings/{wedding}/photos/{photo}.jpg",
                content_type="image/jpeg",
                size_bytes=2_400_000,
            ),
        )
    finally:
        await publisher.stop()

    async def all_gone() -> bool:
        for redis in region_redis.values():
            if await redis.exists(*doomed, tagged, keys.tag_index(f"wedding:{wedding}:photos")):
                return False
        return True

    await eventually(all_gone, what="purged keys still present in some region")
    for region, redis in region_redis.items():
        assert await redis.get(bystander) == b"fresh", region
