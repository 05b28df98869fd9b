"""The consistency checker reads purges back: 100% in a clean run, and the stale share when one is dropped."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from cachesync.consumers.ops.consistency import ConsistencyChecker
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult
from cachesync.consumers.sinks.redis import RedisSink
from tests.helpers import eventually


class DropsOnePurge(RedisSink):
    """Reports every purge applied but silently skips the one for `victim`: a lost purge."""

    victim = ""

    async def flush(self) -> FlushResult:
        everything = list(self._pending)
        self._pending = [c for c in everything if c.entity != f"wedding:{self.victim}"]
        result = await super().flush()
        return FlushResult(applied=len(everything), notes=result.notes)


async def _run(
    settings: Settings,
    region_redis: dict[str, Redis],
    run_roles_bg: Any,
    eu_sink: type[RedisSink],
    n: int,
) -> tuple[ConsistencyChecker, list[str]]:
    run = uuid.uuid4().hex[:6]
    weddings = [f"w-{run}-{i}" for i in range(n)]
    before = int(time.time() * 1000) - 10_000  # cached ten seconds before the uploads
    for redis in region_redis.values():
        for w in weddings:
            await cache_put(redis, f"wedding:{w}:gallery", b"old", written_at_ms=before)
            await cache_put(
                redis, f"photo:old-{w}", b"old", tags=[f"wedding:{w}:photos"], written_at_ms=before
            )
    DropsOnePurge.victim = weddings[0]
    sinks = [
        SinkRole(settings, (eu_sink if r == "eu-west" else RedisSink)(r, u))
        for r, u in settings.region_redis_urls.items()
    ]
    await run_roles_bg([MapperRole(settings), *sinks])
    events = [
        new_event(
            "photo.uploaded",
            wedding_id=w,
            photo_id=f"p-{w}",
            album_id=None,
            path=f"/weddings/{w}/photos/p.jpg",
            content_type="image/jpeg",
            size_bytes=1,
        )
        for w in weddings
    ]
    checker = ConsistencyChecker(
        settings,
        window_s=0.5,
        recheck_s=0.3,
        give_up_s=2.0,
        edge_urls={},
        event_ids={e["event_id"] for e in events},
    )
    stop = asyncio.Event()
    task = asyncio.create_task(checker.run(stop))
    await asyncio.wait_for(checker.ready.wait(), 10)
    pub = EventPublisher(settings)
    await pub.start()
    try:
        for event in events:
            await pub.publish("photo.uploaded", event)
    finally:
        await pub.stop()

    async def all_probed() -> bool:
        done = [checker.tallies.get((r, "redis")) for r in settings.topology.regions]
        return all(t is not None and t.probed == n for t in done) and checker.pending == 0

    try:
        await eventually(all_probed, within=30, what="every purge read back")
    finally:
        stop.set()
        await task
        await checker.close()
    return checker, weddings


async def test_clean_run_converges_fully(
    settings: Settings, topics: list[str], region_redis: dict[str, Redis], run_roles_bg
) -> None:
    checker, _ = await _run(settings, region_redis, run_roles_bg, RedisSink, n=8)
    for region in settings.topology.regions:
        tally = checker.tallies[(region, "redis")]
        assert (tally.probed, tally.converged, tally.gave_up) == (8, 8, 0), region
        assert tally.share == 1.0
        assert tally.quantile(0.99) is not None and tally.quantile(0.99) >= 0


async def test_a_dropped_purge_shows_as_stale_share(
    settings: Settings, topics: list[str], region_redis: dict[str, Redis], run_roles_bg
) -> None:
    checker, weddings = await _run(settings, region_redis, run_roles_bg, DropsOnePurge, n=5)
    eu = checker.tallies[("eu-west", "redis")]
    assert (eu.probed, eu.converged, eu.gave_up) == (5, 4, 1)
    assert eu.share == 0.8
    assert f"wedding:{weddings[0]}:gallery" in eu.stale_examples[0]
    for region in ("us-east", "ap-southeast"):
        assert checker.tallies[(region, "redis")].share == 1.0


async def test_refill_is_not_stale_but_an_old_copy_is(
    settings: Settings, region_redis: dict[str, Redis]
) -> None:
    """The write stamp decides: newer than the event is a refill, older is stale, none is unjudged."""
    from cachesync.consumers.ops.consistency import Probe, Tally

    redis = region_redis["us-east"]
    run = uuid.uuid4().hex[:6]
    event_at = int(time.time() * 1000)
    await cache_put(redis, f"fresh-{run}", b"v", tags=[f"t-{run}"], written_at_ms=event_at + 5)
    await cache_put(redis, f"old-{run}", b"v", tags=[f"t-{run}"], written_at_ms=event_at - 5)
    await redis.set(f"unstamped-{run}", b"v")
    checker = ConsistencyChecker(settings, edge_urls={})
    try:
        probe = Probe(
            due=0,
            seq=0,
            region="us-east",
            sink="redis",
            event_id="e",
            command_id="c",
            occurred_at=event_at,
            applied_at=event_at,
            keys=[f"unstamped-{run}"],
            tags=[f"t-{run}"],
        )
        tally = Tally()
        assert await checker._stale(probe, tally) == [f"old-{run}"]
        assert tally.unjudged_keys == 1
    finally:
        await checker.close()


async def test_edge_copy_from_before_the_event_is_stale(settings: Settings, edge: str) -> None:
    """Through real Varnish: a HIT whose Age reaches back before the event is stale; after a PURGE it is not."""
    import httpx

    from cachesync.consumers.ops.consistency import Probe, Tally

    page = f"/weddings/w-{uuid.uuid4().hex[:8]}/gallery"
    async with httpx.AsyncClient(base_url=edge) as http:
        await http.get(page)
        await asyncio.sleep(2.2)  # let the cached copy age: Age has whole seconds
        event_at = int(time.time() * 1000)
        checker = ConsistencyChecker(settings, edge_urls={"eu-west": edge})
        try:
            probe = Probe(
                due=0,
                seq=0,
                region="eu-west",
                sink="http_purge",
                event_id="e",
                command_id="c",
                occurred_at=event_at,
                applied_at=event_at,
                urls=[page],
            )
            assert await checker._stale(probe, Tally()) == [page]
            assert (await http.request("PURGE", page)).status_code == 200
            assert await checker._stale(probe, Tally()) == []
        finally:
            await checker.close()
