"""Each CDN sink against its real counterpart: the Cloudflare stub, moto, Varnish, region Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
import stamina
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand, WarmCommand, command_id
from cachesync.consumers.errors import RetryAfter
from cachesync.consumers.pipeline.kafka import make_producer
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.cloudfront import CloudFrontSink
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.warmer import WarmerSink
from cachesync.schemas import SingleObjectCodec
from cachesync.topology.model import CdnPolicy
from tests.helpers import eventually
from tests.integrations.caching.conftest import CloudflareApi

EU = "eu-west"
POLICY = CdnPolicy(window_ms=200)


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


def purge(
    run: str, i: int, *, entity: str | None = None, version: int = 1, **fields
) -> PurgeCommand:  # type: ignore[no-untyped-def]
    event = f"ev-{run}-{i}"
    return PurgeCommand(
        command_id=command_id(event, EU, "purge"),
        origin_event_id=event,
        origin_event_type="photo.updated",
        origin_occurred_at=version,
        region=EU,
        entity=entity or f"wedding:w-{run}-{i}",
        version=version,
        issued_at=version,
        scope="photo",
        **fields,
    )


async def test_cloudflare_429s_are_retried_after_retry_after_and_nothing_is_lost(
    settings: Settings, topics: list[str], run_roles_bg, cloudflare_api: CloudflareApi
) -> None:
    """A zone that allows one call per second answers 429s; every tag is purged in the end."""
    run = uuid.uuid4().hex[:8]
    stub = cloudflare_api.stub
    stub.set_rate(1.0, 1)
    zone = f"zone-{run}"
    commands = [purge(run, i, tags=(f"tag-{run}-{i}",)) for i in range(250)]
    test_settings = settings.model_copy(
        update={"group_prefix": f"{settings.group_prefix}-cf-{run}"}
    )
    sink = CloudflareSink(
        EU,
        zone=zone,
        token=SecretStr(cloudflare_api.token),
        public_url="https://eu.weddings.example",
        policy=POLICY,
        api_url=cloudflare_api.url,
        rate_per_s=100,  # our side believes in a faster plan than the zone has
    )
    role = SinkRole(test_settings, sink, auto_offset_reset="latest")
    await run_roles_bg([role])

    codec = SingleObjectCodec(settings.catalog)
    producer = make_producer(settings.kafka_bootstrap_servers, client_id="test-429")
    await producer.start()
    try:
        for cmd in commands:
            await producer.send(
                settings.commands_topic(EU),
                codec.encode("purge", cmd.to_record()),
                key=cmd.entity.encode(),
            )
        await producer.flush()
    finally:
        await producer.stop()

    wanted = {t for c in commands for t in c.tags}

    async def all_purged() -> bool:
        return wanted <= stub.purged("tags", zone)

    await eventually(all_purged, within=40, what="tags never purged after 429s")
    assert stub.count(429, zone) >= 1 and sink.throttled >= 1
    assert role.stats.dead_lettered == 0
    assert all(len(c.items) <= 100 for c in stub.applied(zone))


async def test_cloudfront_retried_batch_is_never_a_second_invalidation(
    settings: Settings, region_redis: dict[str, Redis], cloudfront_endpoint: str, distribution: str
) -> None:
    """The same commands flushed again, even by a restarted sink, create no second invalidation."""
    run = uuid.uuid4().hex[:8]
    commands = [purge(run, i, urls=(f"/weddings/w-{run}/photos/p{i}.jpg",)) for i in range(5)]

    def make() -> CloudFrontSink:
        return CloudFrontSink(
            EU,
            distribution=distribution,
            redis=settings.region_redis_urls[EU],
            policy=POLICY,
            endpoint_url=cloudfront_endpoint,
            aws_access_key_id=SecretStr("testing"),
            aws_secret_access_key=SecretStr("testing"),
        )

    first = make()
    await first.setup()
    for cmd in commands:
        first.add(cmd)
    assert (await first.flush()).applied == 5
    await first.close()
    [created] = first.invalidations
    assert sorted(created.paths) == sorted(c.urls[0] for c in commands)
    assert created.invalidation_id and not created.deduplicated

    # The process died before committing: the batch is re-read by a new process. Even
    # with the applied markers gone, the batch reference in Redis prevents a second one.
    redis = region_redis[EU]
    await redis.delete(*(keys.applied("cloudfront", c.command_id) for c in commands))
    second = make()
    await second.setup()
    for cmd in commands:
        second.add(cmd)
    assert (await second.flush()).applied == 5
    [again] = second.invalidations
    assert again.deduplicated and again.invalidation_id == created.invalidation_id
    # With the markers present, the commands are skipped before any reference is made.
    for cmd in commands:
        second.add(cmd)
    assert (await second.flush()).applied == 5
    assert len(second.invalidations) == 1
    assert second.calls == 0
    listed = await second._client.list_invalidations(DistributionId=distribution)
    assert listed["InvalidationList"]["Quantity"] == 1
    await second.close()


async def test_cloudfront_respects_in_progress_limits_by_escalating_and_waiting(
    settings: Settings, cloudfront_endpoint: str, distribution: str
) -> None:
    """With 2,995 paths in progress, 40 new paths become two wildcards; with none free, it waits."""
    run = uuid.uuid4().hex[:8]
    sink = CloudFrontSink(
        EU,
        distribution=distribution,
        redis=settings.region_redis_urls[EU],
        policy=POLICY,
        endpoint_url=cloudfront_endpoint,
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
    )
    await sink.setup()
    # Invalidations started elsewhere and still running (unknown to moto, so never "completed").
    sink.in_flight["STILL-RUNNING"] = (2995, 0)
    urls = tuple(f"/weddings/w-{run}/photos/p{i}.jpg" for i in range(20))
    urls2 = tuple(f"/weddings/x-{run}/photos/p{i}.jpg" for i in range(20))
    sink.add(purge(run, 0, urls=urls))
    sink.add(purge(run, 1, urls=urls2))
    assert (await sink.flush()).applied == 2
    [made] = sink.invalidations
    assert sorted(made.paths) == [f"/weddings/w-{run}/photos/*", f"/weddings/x-{run}/photos/*"]

    sink.in_flight["STILL-RUNNING"] = (100, 15)  # every wildcard slot taken
    sink.add(purge(run, 2, prefixes=(f"/vendors/v-{run}/",)))
    with pytest.raises(RetryAfter):
        await sink.flush()
    sink.in_flight["STILL-RUNNING"] = (3000, 0)  # every path slot taken
    sink.add(purge(run, 3, urls=(f"/weddings/y-{run}/gallery",)))
    with pytest.raises(RetryAfter):
        await sink.flush()
    assert len(sink.invalidations) == 1
    await sink.close()


async def _cache(http: httpx.AsyncClient, path: str) -> str:
    await http.get(path)
    response = await http.get(path)
    assert response.headers["X-Cache"] == "HIT", path
    return response.headers["X-Origin-Generation"]


async def test_http_purge_by_url_surrogate_key_soft_and_prefix_against_varnish(
    settings: Settings, edge: str
) -> None:
    """PURGE by URL and by xkey drop objects; soft purge serves stale once; BAN drops a prefix."""
    run = uuid.uuid4().hex[:8]
    w = f"w-{run}"
    by_url, by_key, untouched = (
        f"/weddings/{w}/gallery",
        f"/weddings/{w}/photos/p1.jpg",
        f"/weddings/{w}/photos/p2.jpg",
    )
    soft_page, banned = f"/vendors/v-{run}", f"/w/{w}/schedule"
    async with httpx.AsyncClient(base_url=edge) as http:
        before = {p: await _cache(http, p) for p in (by_url, by_key, untouched, soft_page, banned)}
        sink = HttpPurgeSink(EU, edge_url=edge, redis=settings.region_redis_urls[EU], policy=POLICY)
        sink.add(purge(run, 0, urls=(by_url,), tags=("photo:p1-unrelated",)))
        sink.add(purge(run, 1, urls=(f"/weddings/{w}/nothing-cached",), prefixes=(f"/w/{w}/",)))
        assert (await sink.flush()).applied == 2
        # Surrogate keys: the origin tagged p1.jpg with photo:p1 and wedding:<w>:photos.
        sink.add(purge(run, 2, tags=("photo:p1",)))
        assert (await sink.flush()).applied == 1
        await sink.close()

        for path in (by_url, banned, by_key):
            response = await http.get(path)
            assert response.headers["X-Cache"] == "MISS", path
            assert response.headers["X-Origin-Generation"] != before[path]
        assert (await http.get(untouched)).headers["X-Origin-Generation"] == before[untouched]

        soft = HttpPurgeSink(EU, edge_url=edge, soft=True, policy=POLICY)
        soft.add(purge(run, 3, tags=(f"vendor:v-{run}",)))
        assert (await soft.flush()).applied == 1
        await soft.close()
        stale = await http.get(soft_page)
        assert stale.headers["X-Cache"] == "STALE"  # served from grace while refetching
        assert stale.headers["X-Origin-Generation"] == before[soft_page]

        async def refreshed() -> bool:
            r = await http.get(soft_page)
            return r.headers["X-Origin-Generation"] != before[soft_page]

        await eventually(refreshed, what="soft-purged page never refreshed")


def warm(run: str, wedding: str, *, version: int, event: str, urls: tuple[str, ...]) -> WarmCommand:
    return WarmCommand(
        command_id=command_id(event, EU, "warm", wedding),
        origin_event_id=event,
        origin_event_type="photo.uploaded",
        origin_occurred_at=version,
        region=EU,
        entity=f"wedding:{wedding}",
        version=version,
        issued_at=int(time.time() * 1000),
        wedding_id=wedding,
        photo_urls=urls,
        deadline=int(time.time() * 1000) + 60_000,
    )


async def test_warmer_waits_for_its_purge_drops_overtaken_warms_and_confirms_hits(
    settings: Settings, region_redis: dict[str, Redis], edge: str
) -> None:
    """Before the purge is applied the warm waits; after, it fetches (MISS) and confirms a HIT;
    a warm older than the last applied purge of its wedding is dropped."""
    run = uuid.uuid4().hex[:8]
    wedding = f"w-{run}"
    page = f"/weddings/{wedding}/gallery"
    redis = region_redis[EU]
    sink = WarmerSink(
        EU,
        edge_url=edge,
        redis=settings.region_redis_urls[EU],
        after=("http_purge",),
        policy=POLICY,
    )
    current = warm(run, wedding, version=2_000, event=f"ev-{run}-new", urls=(page,))
    # Tier order is the runner's: it holds the warm back while its purge is not applied.
    runner = SinkRole(settings, sink)
    assert runner.tiers is not None
    with pytest.raises(RetryAfter):
        await runner.hold_for_earlier_tiers([current])
    assert not sink.results

    # The purge of that event is applied by the edge's purge sink.
    purger = HttpPurgeSink(EU, edge_url=edge, redis=settings.region_redis_urls[EU], policy=POLICY)
    purger.add(
        replace(
            purge(run, 0, entity=f"wedding:{wedding}", version=2_000, urls=(page,)),
            origin_event_id=current.origin_event_id,
        )
    )
    await purger.flush()
    await purger.close()
    assert await redis.get(keys.purge_version("http_purge", f"wedding:{wedding}")) == b"2000"
    await runner.hold_for_earlier_tiers([current])  # no longer held

    older = warm(run, wedding, version=1_000, event=f"ev-{run}-old", urls=(page,))
    sink.add(current)
    sink.add(older)
    result = await sink.flush()
    assert result.applied == 1
    assert sink.dropped[-1] == (older.command_id, "fenced")
    [fetched] = list(sink.results)
    assert fetched.url == page and fetched.cache_status == "MISS" and fetched.confirmed
    async with httpx.AsyncClient(base_url=edge) as http:
        assert (await http.get(page)).headers["X-Cache"] == "HIT"
    await runner.stop()  # the runner was never started; this closes its clients and the sink
