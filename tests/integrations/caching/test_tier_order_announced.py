"""Tier order within a region, learnt from the earlier tier's announcement (pipeline/tiers.py).

Each test runs the real roles (mapper and sinks) against Kafka, the region's Redis and
the local Varnish, and judges the order from the caches themselves: a Redis key gone,
a page's origin generation at the edge (`X-Origin-Generation`), whether the edge serves
a page from its cache (`X-Cache`). Each test fails if the runner's tier order is taken
away: the edge would purge while Redis still holds the key, the warm would fetch the
stale copy before the purge dropped it, or a stopped Redis sink would never let go.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.pipeline.tiers import TierWatch
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.consumers.sinks.registry import build_sink
from cachesync.topology.admin import delete_topics
from cachesync.topology.model import CdnPolicy
from tests.helpers import eventually
from tests.integrations.caching.crashes import own_topics, send_commands

EU = "eu-west"
# A wedding whose guests were never described is warmed in the default region.
DEFAULT = "us-east"
POLICY = CdnPolicy(window_ms=200)


@dataclass
class Photo:
    """One photo.uploaded of a wedding of its own: its Redis key and its album page."""

    run: str
    n: int
    event: dict[str, Any] = field(init=False)
    generation: str = ""

    def __post_init__(self) -> None:
        w, a, p = f"w-{self.run}-{self.n}", f"a-{self.run}-{self.n}", f"p-{self.run}-{self.n}"
        self.event = new_event(
            "photo.uploaded",
            wedding_id=w,
            photo_id=p,
            album_id=a,
            path=f"/weddings/{w}/photos/{p}.jpg",
            content_type="image/jpeg",
            size_bytes=1,
        )

    @property
    def key(self) -> str:
        return f"wedding:{self.event['wedding_id']}:album:{self.event['album_id']}"

    @property
    def page(self) -> str:
        return f"/weddings/{self.event['wedding_id']}/albums/{self.event['album_id']}"

    @property
    def gallery(self) -> str:
        return f"/weddings/{self.event['wedding_id']}/gallery"

    @property
    def photo_page(self) -> str:
        return str(self.event["path"])


async def cached(http: httpx.AsyncClient, path: str) -> str:
    """Put `path` in the edge's cache; its origin generation."""
    await http.get(path)
    again = await http.get(path)
    assert again.headers["X-Cache"] == "HIT", path
    return again.headers["X-Origin-Generation"]


async def publish(settings: Settings, *events: dict[str, Any]) -> float:
    pub = EventPublisher(settings)
    await pub.start()
    try:
        for event in events:
            await pub.publish("photo.uploaded", event)
    finally:
        await pub.stop()
    return time.monotonic()


def own_groups(settings: Settings, name: str) -> Settings:
    return settings.model_copy(update={"group_prefix": f"{settings.group_prefix}-{name}"})


class OrderWatch:
    """Asks Varnish, then Redis, every few milliseconds: when each page lost its cached
    copy, when each key went, and every time a page was gone while its key was still
    there (the edge purged before Redis). Page first, key second: a page seen purged
    before a key seen present is a purge that came first, whatever the timing."""

    def __init__(self, http: httpx.AsyncClient, redis: Redis, photos: list[Photo]) -> None:
        self.http, self.redis, self.photos = http, redis, photos
        self.purged: dict[int, float] = {}
        self.gone: dict[int, float] = {}
        self.violations: list[str] = []

    async def run(self) -> None:
        while True:
            for photo in self.photos:
                if photo.n in self.purged and photo.n in self.gone:
                    continue
                page = await self.http.get(photo.page)
                page_purged = page.headers["X-Origin-Generation"] != photo.generation
                key_there = bool(await self.redis.exists(photo.key))
                now = time.monotonic()
                if page_purged:
                    self.purged.setdefault(photo.n, now)
                if not key_there:
                    self.gone.setdefault(photo.n, now)
                elif page_purged:
                    self.violations.append(photo.page)
            await asyncio.sleep(0.02)


async def test_an_edge_never_purges_before_redis_and_follows_its_announcement(
    settings: Settings, topics: list[str], edge: str, run_roles_bg: Any, region_redis: Any
) -> None:
    """With eu-west's Redis sink stopped, its edge holds five purges; once Redis applies
    them, the edge purges each after its key is gone, woken by Redis's announcement."""
    run = uuid.uuid4().hex[:8]
    group = own_groups(settings, f"announced-{run}")
    redis: Redis = region_redis[EU]
    photos = [Photo(run, n) for n in range(5)]
    edge_role = SinkRole(
        group,
        HttpPurgeSink(EU, edge_url=edge, redis=settings.region_redis_urls[EU], policy=POLICY),
        auto_offset_reset="latest",
    )
    await run_roles_bg([MapperRole(settings), edge_role])
    async with httpx.AsyncClient(base_url=edge) as http:
        for photo in photos:
            photo.generation = await cached(http, photo.page)
            await redis.set(photo.key, "cached")
        watch = OrderWatch(http, redis, photos)
        watcher = asyncio.create_task(watch.run())
        try:
            await publish(settings, *(p.event for p in photos))
            await asyncio.sleep(2.0)  # the edge has seen the purges by now
            assert not watch.purged, "the edge purged while Redis had not applied"
            assert edge_role.held_events, "the edge is not waiting for Redis"

            heard = edge_role.tiers.announcements if edge_role.tiers else 0
            await run_roles_bg([SinkRole(group, RedisSink(EU, settings.region_redis_urls[EU]))])

            async def all_purged() -> bool:
                return len(watch.purged) == len(photos) and len(watch.gone) == len(photos)

            await eventually(all_purged, what="the edge never purged after Redis applied")
        finally:
            watcher.cancel()
    assert not watch.violations, f"purged at the edge while Redis still held: {watch.violations}"
    assert edge_role.tiers is not None and edge_role.tiers.announcements > heard
    for photo in photos:
        assert watch.purged[photo.n] >= watch.gone[photo.n]


async def test_a_warm_never_fetches_before_the_purge_of_the_tier_it_warms_through(
    settings: Settings, topics: list[str], edge: str, run_roles_bg: Any, region_redis: Any
) -> None:
    """The warmer (built from the topology: it warms through the HTTP edge) holds its warm
    while the edge's purge sink is stopped; once the edge purged, it warms: the first GET
    of the purged gallery is a HIT of a fresh copy. A warm before the purge would have
    fetched the stale copy, then lost it to the purge: that GET would be a MISS."""
    run = uuid.uuid4().hex[:8]
    group = own_groups(settings, f"warm-{run}")
    photo = Photo(run, 0)
    warmer = build_sink(group, DEFAULT, "warmer")
    assert warmer.after == ("http_purge",), "the local topology's front is the HTTP edge"
    assert group.region_edge_urls[DEFAULT] == edge
    warmer_role = SinkRole(group, warmer, auto_offset_reset="latest")
    redis_role = SinkRole(
        group, RedisSink(DEFAULT, settings.region_redis_urls[DEFAULT]), auto_offset_reset="latest"
    )
    await run_roles_bg([MapperRole(settings), redis_role, warmer_role])
    async with httpx.AsyncClient(base_url=edge) as http:
        stale = await cached(http, photo.gallery)
        await publish(settings, photo.event)
        await asyncio.sleep(2.0)  # the warmer has seen the warm by now
        held = set(warmer_role.held_events)

        # The edge's purge sink starts late, from the topic's start: purges other tests
        # left there are past their wait for Redis (1 s here) and go through at once.
        policy = POLICY.model_copy(update={"tier_max_wait_s": 1.0})
        purger = HttpPurgeSink(
            DEFAULT, edge_url=edge, redis=settings.region_redis_urls[DEFAULT], policy=policy
        )
        await run_roles_bg([SinkRole(group, purger)])
        redis: Redis = region_redis[DEFAULT]

        async def warmed() -> bool:
            purged = await redis.exists(
                keys.applied_event("http_purge", str(photo.event["event_id"]))
            )
            return bool(purged) and warmer_role.stats.applied >= 1

        await eventually(warmed, what="the warm never followed the edge's purge")
        first = await http.get(photo.gallery)
    assert first.headers["X-Cache"] == "HIT", "the warm fetched before the purge dropped it"
    assert first.headers["X-Origin-Generation"] != stale
    assert held == {str(photo.event["event_id"])}, "the warmer did not wait for the edge"
    assert warmer_role.tiers is not None and warmer_role.tiers.announcements > 0


async def test_a_stopped_redis_sink_holds_the_edge_only_up_to_the_configured_bound(
    settings: Settings, topics: list[str], edge: str, run_roles_bg: Any
) -> None:
    """eu-west's Redis sink never runs: its edge keeps the page while the purge is within
    `cdn.tier_max_wait_s` (3 s here) of being issued, then purges it anyway."""
    run = uuid.uuid4().hex[:8]
    bound = 3.0
    policy = POLICY.model_copy(update={"tier_max_wait_s": bound})
    group = own_groups(settings, f"bound-{run}")
    photo = Photo(run, 0)
    sink = HttpPurgeSink(EU, edge_url=edge, redis=settings.region_redis_urls[EU], policy=policy)
    assert sink.after == ("redis",) and sink.after_max_wait_s == bound
    await run_roles_bg([MapperRole(settings), SinkRole(group, sink, auto_offset_reset="latest")])
    async with httpx.AsyncClient(base_url=edge) as http:
        photo.generation = await cached(http, photo.page)
        published = await publish(settings, photo.event)
        await asyncio.sleep(bound / 2)
        page = await http.get(photo.page)
        assert page.headers["X-Origin-Generation"] == photo.generation, "purged before Redis"

        async def purged() -> bool:
            page = await http.get(photo.page)
            return page.headers["X-Origin-Generation"] != photo.generation

        await eventually(purged, within=bound + 10, what="the edge never let go of the purge")
    waited = time.monotonic() - published
    assert bound - 0.5 <= waited <= bound + 5, waited


async def test_an_announced_event_is_taken_as_applied_without_reading_its_marker(
    settings: Settings,
) -> None:
    """An announcement goes out after the markers of the events it names are written, so
    the watch takes it as theirs: an event heard of costs no marker read, and one not heard
    of is read once, at the start of the wait (and again only per recheck)."""
    run = uuid.uuid4().hex[:8]
    url = settings.region_redis_urls[DEFAULT]
    redis = Redis.from_url(url)
    watch = TierWatch(url, DEFAULT, ["redis"], recheck_s=5.0)
    reads: list[list[str]] = []
    not_applied = watch.markers.not_applied

    async def counted(sinks: Any, event_ids: list[str]) -> set[str]:
        reads.append(list(event_ids))
        return await not_applied(sinks, event_ids)

    watch.markers.not_applied = counted  # type: ignore[method-assign]
    heard, marked, neither = f"ev-{run}-heard", f"ev-{run}-marked", f"ev-{run}-neither"
    try:
        await watch.start()
        await asyncio.wait_for(watch.subscribed.wait(), timeout=10)
        # No marker: only the announcement says it (as it would, a moment after the marker).
        await redis.publish(keys.tier_applied(DEFAULT, "redis"), heard)
        await eventually(lambda: watch.announcements >= 1, what="the announcement")
        assert await watch.wait({heard}, timeout_s=1.0) == set()
        assert reads == [], "an announced event's marker was read"

        await redis.set(keys.applied_event("redis", marked), 1, ex=60)
        assert await watch.wait({marked, heard}, timeout_s=1.0) == set()
        assert reads == [[marked]], "only the event not heard of is read, once"

        assert await watch.wait({neither}, timeout_s=0.3) == {neither}
    finally:
        await watch.close()
        await redis.delete(keys.applied_event("redis", marked))
        await redis.aclose()


async def test_a_split_purge_is_announced_only_once_its_last_part_is_applied(
    settings: Settings,
) -> None:
    """The Redis sink announces an event when its event marker is set: at the purge's last
    part, not at an earlier one (a follower takes the announcement for the marker)."""
    own = await own_topics(settings, "split-announced")
    run = uuid.uuid4().hex[:8]
    event = f"ev-{run}-split"
    parts = [
        PurgeCommand(
            command_id=f"cmd-{run}-{n}",
            origin_event_id=event,
            origin_event_type="vendor.updated",
            origin_occurred_at=100,
            region=DEFAULT,
            entity=f"vendor:{run}",
            version=100,
            issued_at=int(time.time() * 1000),
            scope="vendor",
            keys=(f"wedding:{run}-{n}:vendors",),
            parts_after=1 - n,
        )
        for n in range(2)
    ]
    redis = Redis.from_url(own.region_redis_urls[DEFAULT])
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.tier_applied(DEFAULT, "redis"))
    role = SinkRole(own, RedisSink.from_settings(own, DEFAULT))
    stop = asyncio.Event()
    await role.start()
    task = asyncio.create_task(role.loop.run(stop))
    heard: list[set[str]] = []

    async def announced() -> bool:
        while (message := await pubsub.get_message(timeout=0.05)) is not None:
            heard.append(set(message["data"].decode().split("\n")))
        return bool(heard)

    try:
        await send_commands(own, parts[:1])
        await eventually(
            lambda: role.loop.records_committed >= 1 or role.stats.applied >= 1,
            what="the first part applied",
        )
        await asyncio.sleep(0.3)
        assert not await announced(), f"announced before its last part: {heard}"
        await send_commands(own, parts[1:])
        await eventually(announced, what="the announcement of the whole purge")
        assert heard == [{event}]
    finally:
        stop.set()
        await task
        await role.stop()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.delete(keys.applied_event("redis", event))
        await redis.aclose()
        await delete_topics(own.kafka_bootstrap_servers, own.topic_prefix)
