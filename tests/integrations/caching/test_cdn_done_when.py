"""Issue 4's "done when": one photo upload in Tuscany reaches Redis, Cloudflare, CloudFront and Varnish."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import aioboto3
import httpx
import pytest
import stamina
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.cloudfront import CloudFrontSink
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.consumers.sinks.warmer import WarmerSink
from cachesync.topology.model import CdnPolicy
from tests.helpers import eventually
from tests.integrations.caching.conftest import CloudflareApi

EU = "eu-west"
POLICY = CdnPolicy(window_ms=200)


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


async def invalidations(endpoint: str, distribution: str) -> list[dict[str, object]]:
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    async with session.client("cloudfront", endpoint_url=endpoint) as client:
        listed = await client.list_invalidations(DistributionId=distribution)
        out = []
        for item in listed["InvalidationList"].get("Items", []):
            got = await client.get_invalidation(DistributionId=distribution, Id=item["Id"])
            out.append(got["Invalidation"])
        return out


async def test_photo_uploaded_in_tuscany_purges_every_tier_and_warms_the_european_edge(
    settings: Settings,
    topics: list[str],
    region_redis: dict[str, Redis],
    run_roles_bg,
    edge: str,
    cloudflare_api: CloudflareApi,
    cloudfront_endpoint: str,
    distribution: str,
) -> None:
    """Redis keys go in every region; one Cloudflare tag purge, one CloudFront invalidation,
    Varnish purged by URL and surrogate key, and the photos are HITs at the European edge again."""
    run = uuid.uuid4().hex[:8]
    wedding, photo, album, older = f"w-{run}", f"ph-{run}", f"a-{run}", f"old-{run}"
    photo_path = f"/weddings/{wedding}/photos/{photo}.jpg"
    gallery = f"/weddings/{wedding}/gallery"
    album_page = f"/weddings/{wedding}/albums/{album}"
    older_photo = f"/weddings/{wedding}/photos/{older}.jpg"  # reachable only by its xkey
    zone = f"zone-eu-{run}"

    # Stale copies everywhere: platform Redis in all regions, and the European edge.
    doomed = [f"wedding:{wedding}:gallery", f"wedding:{wedding}:album:{album}", f"photo:{photo}"]
    for redis in region_redis.values():
        for key in doomed:
            await cache_put(redis, key, b"stale")
    async with httpx.AsyncClient(base_url=edge) as http:
        stale: dict[str, str] = {}
        for path in (gallery, album_page, older_photo):
            await http.get(path)
            again = await http.get(path)
            assert again.headers["X-Cache"] == "HIT", path
            stale[path] = again.headers["X-Origin-Generation"]

    # This test's own consumer groups, starting at the end of the command topics.
    test_settings = settings.model_copy(
        update={"group_prefix": f"{settings.group_prefix}-cdn-{run}"}
    )
    eu_redis = test_settings.region_redis_urls[EU]
    cloudflare = CloudflareSink(
        EU,
        zone=zone,
        token=SecretStr(cloudflare_api.token),
        public_url="https://eu.weddings.example",
        redis=eu_redis,
        policy=POLICY,
        api_url=cloudflare_api.url,
    )
    cloudfront = CloudFrontSink(
        EU,
        distribution=distribution,
        redis=eu_redis,
        policy=POLICY,
        endpoint_url=cloudfront_endpoint,
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
    )
    warmer = WarmerSink(
        EU,
        edge_url=edge,
        redis=eu_redis,
        after=("redis", "http_purge", "cloudflare", "cloudfront"),
        policy=POLICY,
    )
    sinks = [RedisSink(r, u) for r, u in test_settings.region_redis_urls.items()]
    sinks += [
        cloudflare,
        cloudfront,
        HttpPurgeSink(EU, edge_url=edge, redis=eu_redis, policy=POLICY),
        warmer,
    ]
    roles = [MapperRole(settings)]  # the session's mapper group: no re-mapping of old events
    roles += [SinkRole(test_settings, s, auto_offset_reset="latest") for s in sinks]
    await run_roles_bg(roles)

    publisher = EventPublisher(test_settings)
    await publisher.start()
    photo_event = f"ev-{run}"
    try:
        # The wedding is in Tuscany: its guests' region is eu-west.
        await publisher.publish(
            "wedding.published",
            new_event(
                "wedding.published",
                wedding_id=wedding,
                slug=f"{wedding}-tuscany",
                destination_country="IT",
                guest_countries=["IT"],
            ),
        )
        await publisher.publish(
            "photo.uploaded",
            new_event(
                "photo.uploaded",
                event_id=photo_event,
                wedding_id=wedding,
                photo_id=photo,
                album_id=album,
                path=photo_path,
                content_type="image/jpeg",
                size_bytes=2_400_000,
            ),
        )
    finally:
        await publisher.stop()

    async def redis_purged() -> bool:
        for redis in region_redis.values():
            if await redis.exists(*doomed):
                return False
        return True

    async def warmed() -> bool:
        done = {r.url for r in warmer.results if r.origin_event_id == photo_event and r.confirmed}
        return {photo_path, gallery} <= done

    await eventually(redis_purged, what="platform keys still in some region's Redis")
    try:
        await eventually(
            warmed, within=30, what="photo and gallery not warmed at the European edge"
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: results {list(warmer.results)}, dropped {list(warmer.dropped)}, {roles[-1].stats}"
        ) from None

    # Cloudflare: exactly one call carried the photo tags, and the pages went by URL.
    stub = cloudflare_api.stub
    tag_calls = [
        c for c in stub.applied(zone) if c.kind == "tags" and f"wedding:{wedding}:photos" in c.items
    ]
    assert len(tag_calls) == 1, tag_calls
    assert f"album:{album}" in tag_calls[0].items
    files = stub.purged("files", zone)
    assert {f"https://eu.weddings.example{p}" for p in (gallery, album_page)} <= files
    assert stub.count(429) == 0 and stub.count(400) == 0

    # CloudFront: exactly one invalidation with the photo's paths, recorded by the sink.
    found = [
        inv
        for inv in await invalidations(cloudfront_endpoint, distribution)
        if gallery in inv["InvalidationBatch"]["Paths"]["Items"]  # type: ignore[index]
    ]
    assert len(found) == 1, found
    assert album_page in found[0]["InvalidationBatch"]["Paths"]["Items"]  # type: ignore[index]
    assert found[0]["Id"] in {r.invalidation_id for r in cloudfront.invalidations}

    # Varnish: the tagged-only photo was purged by surrogate key (a fresh MISS); the
    # gallery was purged and re-fetched by the warmer, so a guest now gets a fresh HIT.
    async with httpx.AsyncClient(base_url=edge) as http:
        old = await http.get(older_photo)
        assert old.headers["X-Cache"] == "MISS"
        assert old.headers["X-Origin-Generation"] != stale[older_photo]
        for path in (gallery, photo_path):
            page = await http.get(path)
            assert page.headers["X-Cache"] == "HIT", path
        page = await http.get(gallery)
        assert page.headers["X-Origin-Generation"] != stale[gallery]
        album_now = await http.get(album_page)
        assert album_now.headers["X-Origin-Generation"] != stale[album_page]
