"""A vendor serving 50,000 weddings, on the real stack: its update's purge is split into
commands that fit the broker, together they name every wedding's keys and pages in every
region, and the regions' Redis sinks delete them."""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import MAX_PURGE_BYTES
from cachesync.consumers.ops.platform_cache import cache_put_many
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.codecs import codec_for
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from tests.helpers import eventually

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

WEDDINGS = 50_000
SAMPLED = 300  # weddings whose cached page list is pre-populated in every region's Redis
BROKER_LIMIT = 2 * 1024 * 1024  # message.max.bytes of the local broker (deploy/local/up.sh)


async def _link(state: Redis, settings: Settings, vendor: str, weddings: list[str]) -> None:
    """The vendor's links, written through the index API in one MULTI/EXEC."""
    view = RelationshipIndex(state, settings.topology).batch()
    for wedding in weddings:
        await view.link_vendor(vendor, wedding)
    await view.flush()


async def _purges(
    settings: Settings, event_id: str, since_ms: int
) -> list[tuple[PurgeCommand, int]]:
    """The purge commands of `event_id` on the region topics, with each message's size."""
    topics = [settings.commands_topic(r) for r in settings.topology.regions]
    found: list[tuple[PurgeCommand, int]] = []
    codec = codec_for(settings)
    async with TimeWindow(settings, topics, since_ms=since_ms) as window:
        async for batch in window.batches():
            for record in batch:
                if headers.header(record, headers.EVENT_ID) != event_id.encode():
                    continue
                if headers.header(record, headers.KIND) != b"purge":
                    continue
                decoded = codec.decode(record.value or b"")
                found.append((PurgeCommand.from_record(decoded.record), len(record.value or b"")))
    return found


async def test_a_vendor_serving_50000_weddings_purges_every_wedding_in_every_region(
    settings: Settings, topics: list[str], region_redis: dict[str, Redis], run_roles_bg: Any
) -> None:
    """vendor.updated for a vendor linked to 50,000 weddings: its purges, split to fit the
    broker, name every wedding's key and page in every region, and each region's Redis
    sink deletes the sampled weddings' cached entries."""
    run = uuid.uuid4().hex[:8]
    vendor = f"v-{run}"
    weddings = [f"w-{run}-{i:05d}" for i in range(WEDDINGS)]
    sampled = random.Random(run).sample(weddings, SAMPLED)
    state = Redis.from_url(str(settings.state_redis_url))
    t0 = time.monotonic()
    try:
        await _link(state, settings, vendor, weddings)
        linked_s = time.monotonic() - t0
        entries = [(f"wedding:{w}:vendors", b"stale", []) for w in sampled]
        for redis in region_redis.values():
            await cache_put_many(redis, [*entries, (f"vendor:{vendor}", b"stale", [])])

        sinks = [SinkRole(settings, RedisSink(r, u)) for r, u in settings.region_redis_urls.items()]
        await run_roles_bg([MapperRole(settings), *sinks])
        since = int(time.time() * 1000)
        event = new_event(
            "vendor.updated", vendor_id=vendor, category="florist", changed_fields=["bio"]
        )
        pub = EventPublisher(settings)
        await pub.start()
        try:
            await pub.publish("vendor.updated", event)
        finally:
            await pub.stop()
        published = time.monotonic()

        async def sampled_deleted() -> bool:
            for redis in region_redis.values():
                if await redis.exists(
                    f"vendor:{vendor}", *[f"wedding:{w}:vendors" for w in sampled]
                ):
                    return False
            return True

        await eventually(
            sampled_deleted, within=60, what="the sampled entries deleted in every region"
        )
        applied_s = time.monotonic() - published

        purges = await _purges(settings, str(event["event_id"]), since)
        for region in settings.topology.regions:
            mine = [c for c, _ in purges if c.region == region]
            named_keys = {k for c in mine for k in c.keys}
            named_urls = {u for c in mine for u in c.urls}
            assert {f"wedding:{w}:vendors" for w in weddings} <= named_keys, region
            assert {f"/weddings/{w}/vendors" for w in weddings} <= named_urls, region
            assert {f"vendor:{vendor}", f"vendor:{vendor}:profile"} <= named_keys, region
            assert {c.version for c in mine} == {event["occurred_at"]}
            assert len({c.command_id for c in mine}) == len(mine), "part ids must differ"
        largest = max(size for _, size in purges)
        parts = len(purges) // len(settings.topology.regions)
        assert parts > 1
        assert largest <= MAX_PURGE_BYTES + 4096 < BROKER_LIMIT
        log.info(
            "50,000 weddings: linked in %.1fs; %d parts per region, largest command %d bytes; "
            "sampled keys deleted in every region %.1fs after publishing",
            linked_s,
            parts,
            largest,
            applied_s,
        )
    finally:
        stale = [keys.vendor_weddings(vendor), *(keys.wedding_vendors(w) for w in weddings)]
        for start in range(0, len(stale), 10_000):
            await state.delete(*stale[start : start + 10_000])
        await state.aclose()
