"""Each tier's own counters, read where the cache is: the region's Redis (INFO stats), the
stack's varnishd (varnishstat), the Cloudflare stand-in's GraphQL Analytics (from what it
served as an edge) and CloudWatch in moto (metric data this test puts). The stack's caches are
shared with other tests, so their figures are compared as at least what this test caused."""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from typing import Any

import boto3
import httpx
from redis.asyncio import Redis

from cachesync.consumers.ops.effectiveness.config import EffectivenessSettings
from cachesync.consumers.ops.effectiveness.recorder import Recorder
from cachesync.consumers.ops.effectiveness.store import EffectivenessStore
from cachesync.consumers.ops.effectiveness.tiers import (
    CloudflareAnalytics,
    CloudFrontMetrics,
    read_redis,
    read_varnish,
)
from cachesync.consumers.settings import Settings
from deploy.local.standins.cloudflare import CloudflareStub
from deploy.local.standins.serve import serve
from tests.conftest import metric_points

EU = "eu-west"
ORIGIN = f"http://127.0.0.1:{os.environ.get('ORIGIN_PORT', '16090')}"


async def test_redis_hits_and_misses_come_from_info_stats(
    settings: Settings, region_redis: dict[str, Redis]
) -> None:
    """Five reads of a key that exists and three of keys that do not move INFO's counters."""
    run = uuid.uuid4().hex[:8]
    url = settings.region_redis_urls[EU]
    redis = region_redis[EU]
    await redis.set(f"effectiveness:{run}", b"cached", ex=60)
    before = await read_redis(EU, url)
    for _ in range(5):
        assert await redis.get(f"effectiveness:{run}") == b"cached"
    for n in range(3):
        assert await redis.get(f"effectiveness:{run}:absent:{n}") is None
    after = await read_redis(EU, url)
    assert before.error is None and after.error is None
    assert after.hits - before.hits >= 5
    assert after.misses - before.misses >= 3
    assert "evicted_keys" in after.extra
    assert after.instance == url.split("?")[0] and "@" not in after.instance


async def test_varnish_hits_misses_and_purges_come_from_varnishstat(
    settings: Settings, edge: str
) -> None:
    """A miss, four hits and a purge of a page of this test's own, in the edge's own counters."""
    page = f"/weddings/w-eff-{uuid.uuid4().hex[:8]}/gallery"
    instances = EffectivenessSettings().varnish_instances(settings)
    assert instances.get(EU), f"no varnishd found for {EU}: set VARNISH_INSTANCE"
    before = await read_varnish(EU, instances[EU])
    assert before.error is None, before.error
    async with httpx.AsyncClient(base_url=edge) as http:
        statuses = [(await http.get(page)).headers["X-Cache"] for _ in range(5)]
        assert statuses == ["MISS", "HIT", "HIT", "HIT", "HIT"]
        assert (await http.request("PURGE", page)).status_code == 200
    after = await read_varnish(EU, instances[EU])
    assert after.misses - before.misses >= 1
    assert after.hits - before.hits >= 4
    assert after.extra["purges"] - before.extra["purges"] >= 1
    assert after.extra["origin_requests"] - before.extra["origin_requests"] >= 1


async def test_cloudflare_analytics_count_what_the_stand_in_served() -> None:
    """The stand-in serves GETs as the zone's edge; its GraphQL Analytics give those very
    requests by cache status, and a purge through the API turns the next GET into a miss."""
    stub = CloudflareStub(
        token="t-analytics", origin_url=ORIGIN, zone_hosts={"eu.weddings.example": "zone-eu"}
    )
    page = f"/weddings/w-cf-{uuid.uuid4().hex[:8]}/gallery"
    guest = {"Host": "eu.weddings.example", "User-Agent": "Mozilla/5.0 guest"}
    with serve(stub.app) as url:
        since = time.time() * 1000 - 1000
        async with httpx.AsyncClient(base_url=url) as http:
            first = [
                (await http.get(page, headers=guest)).headers["CF-Cache-Status"] for _ in range(5)
            ]
            purged = await http.post(
                "/client/v4/zones/zone-eu/purge_cache",
                json={"files": [f"https://eu.weddings.example{page}"]},
                headers={"Authorization": "Bearer t-analytics"},
            )
            assert purged.status_code == 200
            then = [
                (await http.get(page, headers=guest)).headers["CF-Cache-Status"] for _ in range(3)
            ]
            unknown = await http.get(page, headers={"Host": "elsewhere.example"})
        assert first == ["MISS", "HIT", "HIT", "HIT", "HIT"] and then == ["MISS", "HIT", "HIT"]
        assert unknown.status_code == 404
        until = time.time() * 1000 + 1000
        analytics = CloudflareAnalytics(url, "t-analytics")
        try:
            reading = await analytics.read(EU, "zone-eu", since, until)
            groups = await analytics.groups(
                "zone-eu", since, until, ["clientRequestPath", "cacheStatus", "userAgent"]
            )
            nothing = await analytics.read(EU, "zone-other", since, until)
            refused = await CloudflareAnalytics(url, "wrong").read(EU, "zone-eu", since, until)
        finally:
            await analytics.aclose()
    assert (reading.hits, reading.misses, reading.error) == (6, 2, None)
    assert sorted((n, d["cacheStatus"]) for n, d in groups) == [(2, "miss"), (6, "hit")]
    assert {d["clientRequestPath"] for _, d in groups} == {page}
    assert (nothing.hits, nothing.misses) == (0, 0)
    assert refused.error is not None and "403" in refused.error


async def test_cloudfront_hit_rate_comes_from_cloudwatch(cloudfront_endpoint: str) -> None:
    """Three minutes of a known traffic pattern put in moto's CloudWatch read back as
    requests and hits per distribution; another distribution's minutes are not mixed in."""
    distribution = f"E{uuid.uuid4().hex[:10].upper()}"
    cw: Any = boto3.client(
        "cloudwatch",
        endpoint_url=cloudfront_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    start = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(minutes=6)
    pattern = [(1200, 95.0), (3000, 60.0), (800, 87.5)]  # requests, cache hit rate (%)
    for n, (requests, rate) in enumerate(pattern):
        for dist, scale in ((distribution, 1), (distribution + "X", 7)):
            dims = [
                {"Name": "DistributionId", "Value": dist},
                {"Name": "Region", "Value": "Global"},
            ]
            at = start + dt.timedelta(minutes=n)
            cw.put_metric_data(
                Namespace="AWS/CloudFront",
                MetricData=[
                    {
                        "MetricName": "Requests",
                        "Dimensions": dims,
                        "Timestamp": at,
                        "Value": requests * scale,
                        "Unit": "None",
                    },
                    {
                        "MetricName": "CacheHitRate",
                        "Dimensions": dims,
                        "Timestamp": at,
                        "Value": rate,
                        "Unit": "Percent",
                    },
                ],
            )
    metrics = CloudFrontMetrics(
        endpoint_url=cloudfront_endpoint, access_key="testing", secret_key="testing"
    )
    since = (start - dt.timedelta(minutes=1)).timestamp() * 1000
    until = time.time() * 1000
    minutes = await metrics.minutes(distribution, since, until)
    reading = await metrics.read(EU, distribution, since, until)
    assert [(m.requests, m.hit_rate) for m in minutes] == [(r, h) for r, h in pattern]
    expected_hits = sum(r * h / 100 for r, h in pattern)
    assert reading.error is None
    assert abs(reading.hits - expected_hits) < 1e-6
    assert abs(reading.misses - (sum(r for r, _ in pattern) - expected_hits)) < 1e-6


async def test_the_recorder_exports_and_keeps_each_interval(
    settings: Settings, region_redis: dict[str, Redis], metric_reader: Any, edge: str
) -> None:
    """One recording interval: each region's hit ratio exported as a metric, and the
    interval's figures written to the state Redis for the report."""
    eff = EffectivenessSettings(interval_s=1)
    recorder = Recorder(settings, eff, enable_key_events=False)
    state = Redis.from_url(str(settings.state_redis_url))
    store = EffectivenessStore(state, settings.group_prefix, retention_s=3600)
    lines: list[str] = []
    recorder.print_lines = lines.extend
    try:
        started = int(time.time() * 1000)
        await recorder.sampler.sample()
        key = f"effectiveness:{uuid.uuid4().hex[:8]}"
        await region_redis[EU].set(key, b"x", ex=60)
        for _ in range(4):
            await region_redis[EU].get(key)
        await recorder.record(store)
        entries = await store.read(started)
    finally:
        await recorder.sampler.aclose()
        await state.aclose()
    samples = [e for e in entries if e.kind == "sample"]
    assert samples, "the interval was not written to the state Redis"
    rows = {(r["region"], r["tier"]): r for r in samples[-1].data["rows"]}
    assert rows[(EU, "redis")]["hits"] >= 4
    assert rows[(EU, "varnish")]["error"] is None
    assert any(line.strip().startswith("[bold]eu-west[/bold] hit ratio: redis") for line in lines)
    points = metric_points(metric_reader, "cachesync.cache.hit_ratio")
    ratios = {(p.attributes["region"], p.attributes["tier"]): p.value for p in points}
    assert 0 < ratios[(EU, "redis")] <= 1
