"""Replaying content topics: the relationship index rebuilt, a dry run that produces nothing, a real replay."""

from __future__ import annotations

import time
import uuid

from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.ops.replay import replay
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from tests.helpers import eventually


async def _publish_history(settings: Settings, run: str) -> tuple[int, list[str]]:
    """A vendor linked to three weddings then unlinked from one; returns the start time and weddings."""
    since = int(time.time() * 1000) - 1
    weddings = [f"w-{run}-{i}" for i in range(3)]
    pub = EventPublisher(settings)
    await pub.start()
    try:
        for w in weddings:
            await pub.publish(
                "wedding.published",
                new_event(
                    "wedding.published",
                    wedding_id=w,
                    slug=w,
                    destination_country="IT",
                    guest_countries=["JP"],
                ),
            )
            await pub.publish(
                "vendor.linked",
                new_event("vendor.linked", vendor_id=f"v-{run}", wedding_id=w, role="florist"),
            )
        await pub.publish(
            "vendor.unlinked",
            new_event("vendor.unlinked", vendor_id=f"v-{run}", wedding_id=weddings[2]),
        )
        await pub.publish(
            "vendor.updated",
            new_event(
                "vendor.updated",
                vendor_id=f"v-{run}",
                category="florist",
                changed_fields=["prices"],
            ),
        )
    finally:
        await pub.stop()
    return since, weddings


async def test_index_rebuilt_from_topics(settings: Settings, topics: list[str]) -> None:
    """An empty state Redis gets the vendor's weddings and the weddings' regions back from the topics."""
    run = uuid.uuid4().hex[:8]
    since, weddings = await _publish_history(settings, run)
    base = str(settings.state_redis_url).rsplit("/", 1)[0]
    fresh = settings.model_copy(update={"state_redis_url": f"{base}/7"})
    state = Redis.from_url(f"{base}/7")
    try:
        assert not await state.exists(keys.vendor_weddings(f"v-{run}"))
        report = await replay(fresh, since_ms=since, index_only=True)
        assert report.records >= 8 and not report.commands
        members = {m.decode() for m in await state.smembers(keys.vendor_weddings(f"v-{run}"))}
        assert members == set(weddings[:2])
        regions = {m.decode() for m in await state.smembers(keys.wedding_regions(weddings[0]))}
        assert regions == {"eu-west", "ap-southeast"}
    finally:
        await state.flushdb()
        await state.aclose()


async def test_dry_run_plans_and_produces_nothing(settings: Settings, topics: list[str]) -> None:
    run = uuid.uuid4().hex[:8]
    since, _ = await _publish_history(settings, run)
    ends_before = await _command_ends(settings)
    report = await replay(settings, since_ms=since, dry_run=True, regions={"eu-west"})
    assert report.events["vendor.linked"] == 3 and report.events["vendor.unlinked"] == 1
    assert {r for r, _ in report.commands} == {"eu-west"}
    assert report.commands[("eu-west", "purge")] == report.records
    assert await _command_ends(settings) == ends_before, "a dry run produced commands"


async def test_replay_purges_again_with_new_command_ids(
    settings: Settings, topics: list[str], region_redis: dict[str, Redis], run_roles_bg
) -> None:
    """After a region lost its purges (stale copies restored), a replay purges them again."""
    run = uuid.uuid4().hex[:8]
    since, weddings = await _publish_history(settings, run)
    redis = region_redis["ap-southeast"]
    stale = [f"wedding:{w}:details" for w in weddings] + [f"vendor:v-{run}:profile"]
    for key in stale:
        await cache_put(redis, key, b"restored-from-an-old-backup")
    group = settings.model_copy(update={"group_prefix": f"{settings.group_prefix}-replay-{run}"})
    # The sink's group starts at the topic's end, so only the replay's commands reach it.
    sink = SinkRole(
        group,
        RedisSink("ap-southeast", settings.region_redis_urls["ap-southeast"]),
        auto_offset_reset="latest",
    )
    await run_roles_bg([sink])
    report = await replay(settings, since_ms=since, regions={"ap-southeast"})
    assert report.commands[("ap-southeast", "purge")] == report.records

    async def purged() -> bool:
        return await redis.exists(*stale) == 0

    await eventually(purged, what="replayed purges not applied")


async def _command_ends(settings: Settings) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        from cachesync.consumers.pipeline.kafka import partitions_of

        tps = await partitions_of(
            settings.kafka_bootstrap_servers,
            [settings.commands_topic(r) for r in settings.topology.regions],
        )
        ends = await consumer.end_offsets(tps)
        return {f"{tp.topic}/{tp.partition}": off for tp, off in ends.items()}
    finally:
        await consumer.stop()
