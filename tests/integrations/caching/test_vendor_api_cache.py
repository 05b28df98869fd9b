"""The vendor API cache against a real uvicorn vendor, real Redis and, for purges, real Kafka."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import BadVendorResponse, VendorRejected, VendorUnavailable
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.consumers.vendor_api import VendorApiClient
from cachesync.topology import VendorApiPolicy
from deploy.local.standins.serve import free_port, serve
from deploy.local.standins.vendor_api import VendorApiStub
from tests.conftest import REPO, metric_points
from tests.helpers import eventually

REGION = "us-east"


class FakeClock:
    """Epoch seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def vendor() -> Iterator[tuple[VendorApiStub, str]]:
    """The local vendor API, served by uvicorn on a loopback port for the whole session."""
    stub = VendorApiStub()
    with serve(stub.app()) as base_url:
        yield stub, base_url


ClientFactory = Callable[..., VendorApiClient]


@pytest.fixture
async def make_client(
    settings: Settings, vendor: tuple[VendorApiStub, str]
) -> AsyncIterator[ClientFactory]:
    """Clients on one region's Redis, for integration `availability` (and `reviews`) at the stub."""
    clients: list[VendorApiClient] = []
    _, base_url = vendor

    def make(
        region: str = REGION, clock: Callable[[], float] = time.time, **policy: Any
    ) -> VendorApiClient:
        defaults: dict[str, Any] = {
            "base_url": base_url,
            "ttl_s": 60,
            "stale_while_revalidate_s": 0,
            "max_stale_s": 300,
            "total_timeout_s": 5.0,
        }
        availability = VendorApiPolicy(**{**defaults, **policy})
        reviews = VendorApiPolicy(**defaults)
        client = VendorApiClient(
            {"availability": availability, "reviews": reviews},
            settings.region_redis_urls[region],
            clock=clock,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def _ids() -> tuple[str, str]:
    vendor_id = f"v-{uuid.uuid4().hex[:10]}"
    return vendor_id, f"/vendors/{vendor_id}/availability"


@pytest.mark.parametrize("clients", [1, 4], ids=["one-client", "four-clients"])
async def test_hundred_concurrent_misses_make_one_upstream_call(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory, clients: int
) -> None:
    """100 concurrent misses, from one client or four with their own Redis pools, call the vendor once."""
    stub, _ = vendor
    vendor_id, path = _ids()
    stub.configure(path, delay_s=0.3)
    pool = [make_client() for _ in range(clients)]

    answers = await asyncio.gather(
        *(pool[i % clients].get("availability", path, vendor_id=vendor_id) for i in range(100))
    )

    assert stub.calls[path] == 1
    assert Counter(a.cache_status for a in answers)["MISS"] == 1
    assert sum(a.coalesced for a in answers) == 99
    assert len({a.content for a in answers}) == 1
    assert answers[0].json()["path"] == path


async def test_hundred_concurrent_misses_across_processes_make_one_upstream_call(
    vendor: tuple[VendorApiStub, str], settings: Settings
) -> None:
    """Four processes, 25 concurrent misses each, released together: one upstream call in all."""
    stub, base_url = vendor
    vendor_id, path = _ids()
    stub.configure(path, delay_s=1.0)  # long enough that every process asks while it is in flight
    redis_url = settings.region_redis_urls[REGION]
    barrier = f"test:vendor-api-barrier:{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [redis_url, base_url, vendor_id, path, "25", barrier]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "deploy.local.standins.vendor_api_worker",
            *args,
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    redis = Redis.from_url(redis_url)
    try:

        async def all_ready() -> bool:
            return int(await redis.get(f"{barrier}:ready") or 0) == len(procs)

        await eventually(all_ready, within=60, what="worker processes not ready")
        await redis.set(f"{barrier}:go", 1, ex=60)
        outputs = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in procs)), timeout=60
        )
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await redis.delete(f"{barrier}:ready", f"{barrier}:go")
        await redis.aclose()

    reports = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    statuses = sum((Counter(r["statuses"]) for r in reports), Counter())
    assert stub.calls[path] == 1
    assert statuses["MISS"] == 1
    assert sum(statuses.values()) == 100
    # Every process but the fetching one got its answer by waiting on the Redis lock.
    assert sum(r["coalesced"] == 25 for r in reports) == 3
    assert len({body for r in reports for body in r["bodies"]}) == 1


async def test_vendor_down_serves_stale_within_its_limit_then_errors(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory
) -> None:
    """Past freshness, a failing vendor is answered by the stale entry, marked STALE, until max_stale_s."""
    stub, _ = vendor
    vendor_id, path = _ids()
    stub.configure(path, cache_control="max-age=10")
    clock = FakeClock()
    client = make_client(clock=clock, max_stale_s=60)
    first = await client.get("availability", path, vendor_id=vendor_id)
    assert first.cache_status == "MISS"

    stub.configure(path, fail="503")
    clock.advance(40)  # stale (10 s fresh), within stale-if-error (60 s)
    stale = await client.get("availability", path, vendor_id=vendor_id)
    assert stale.cache_status == "STALE"
    assert stale.stale_reason == "upstream_error"
    assert stale.error is not None and "503" in stale.error
    assert stale.content == first.content
    assert stale.age_s == pytest.approx(40, abs=1)
    assert stub.calls[path] == 2  # it did ask the vendor

    clock.advance(31)  # 71 s old: past 10 + 60
    with pytest.raises(VendorUnavailable, match="503"):
        await client.get("availability", path, vendor_id=vendor_id)
    assert stub.calls[path] == 3


async def test_vendor_timeout_serves_stale_and_says_so(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory
) -> None:
    """A vendor slower than the policy's deadline is answered from stale, with reason upstream_timeout."""
    stub, _ = vendor
    vendor_id, path = _ids()
    stub.configure(path, cache_control="max-age=10")
    clock = FakeClock()
    client = make_client(clock=clock, total_timeout_s=0.3, read_timeout_s=0.3)
    await client.get("availability", path, vendor_id=vendor_id)

    stub.configure(path, delay_s=2.0)
    clock.advance(20)
    stale = await client.get("availability", path, vendor_id=vendor_id)
    assert (stale.cache_status, stale.stale_reason) == ("STALE", "upstream_timeout")


async def test_etag_revalidation_answered_304_refreshes_the_entry_without_a_body(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory
) -> None:
    """A stale entry is revalidated with If-None-Match; the 304 makes it fresh again, with no new body."""
    stub, _ = vendor
    vendor_id, path = _ids()
    stub.configure(path, cache_control="max-age=10")
    clock = FakeClock()
    client = make_client(clock=clock)
    first = await client.get("availability", path, vendor_id=vendor_id)

    clock.advance(30)
    again = await client.get("availability", path, vendor_id=vendor_id)
    assert again.cache_status == "REVALIDATED"
    assert again.content == first.content
    assert (stub.calls[path], stub.conditional[path], stub.not_modified[path]) == (2, 1, 1)
    assert stub.bodies[path] == 1  # the vendor sent the body once

    clock.advance(5)  # fresh again from the 304, not from the first fetch
    hit = await client.get("availability", path, vendor_id=vendor_id)
    assert hit.cache_status == "HIT"
    assert stub.calls[path] == 2


async def test_changed_data_revalidates_to_the_new_body(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory
) -> None:
    """When the ETag no longer matches, the vendor's 200 replaces the entry."""
    stub, _ = vendor
    vendor_id, path = _ids()
    stub.configure(path, cache_control="max-age=10")
    clock = FakeClock()
    client = make_client(clock=clock)
    await client.get("availability", path, vendor_id=vendor_id)
    stub.bump(path)
    clock.advance(30)
    fresh = await client.get("availability", path, vendor_id=vendor_id)
    assert fresh.cache_status == "MISS"
    assert fresh.json()["version"] == 1
    assert stub.conditional[path] == 1 and stub.not_modified[path] == 0


async def test_stale_while_revalidate_serves_stale_and_refreshes_in_background(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory
) -> None:
    """Within stale-while-revalidate the caller gets the stale entry at once; one background call refreshes it."""
    stub, _ = vendor
    vendor_id, path = _ids()
    stub.configure(path, cache_control="max-age=10, stale-while-revalidate=30")
    clock = FakeClock()
    client = make_client(clock=clock, stale_while_revalidate_s=60)
    await client.get("availability", path, vendor_id=vendor_id)
    stub.bump(path)
    clock.advance(15)

    stub.configure(path, delay_s=0.2)
    answers = await asyncio.gather(
        *(client.get("availability", path, vendor_id=vendor_id) for _ in range(10))
    )
    assert (answers[0].cache_status, answers[0].stale_reason) == ("STALE", "revalidating")
    # Each is the old entry served stale, or (once the refresh has landed) the new one.
    assert {(a.cache_status, a.json()["version"]) for a in answers} <= {("STALE", 0), ("HIT", 1)}
    await client.drain()
    assert stub.calls[path] == 2
    refreshed = await client.get("availability", path, vendor_id=vendor_id)
    assert (refreshed.cache_status, refreshed.json()["version"]) == ("HIT", 1)


@pytest.mark.parametrize(
    ("failure", "error", "message"),
    [
        ("not-json", BadVendorResponse, "not JSON"),
        ("500-html", VendorUnavailable, "HTTP 500"),
        ("huge", BadVendorResponse, "max_body_bytes"),
        ("404", VendorRejected, "HTTP 404"),
    ],
)
async def test_bad_upstream_data_is_never_cached(
    vendor: tuple[VendorApiStub, str],
    make_client: ClientFactory,
    failure: str,
    error: type[Exception],
    message: str,
) -> None:
    """Invalid JSON, an error page, an oversized body: a clear error, nothing in Redis, the next call goes upstream."""
    stub, _ = vendor
    vendor_id, path = _ids()
    stub.configure(path, fail=failure)
    client = make_client(max_body_bytes=100_000)
    with pytest.raises(error, match=message):
        await client.get("availability", path, vendor_id=vendor_id)
    assert (
        await client.store.get(client.cache_key("availability", path, vendor_id=vendor_id)) is None
    )

    stub.configure(path, fail=None)
    healed = await client.get("availability", path, vendor_id=vendor_id)
    assert healed.cache_status == "MISS"
    assert stub.calls[path] == 2


async def test_no_store_and_private_are_not_cached_when_trusted(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory
) -> None:
    """Trusted Cache-Control: no-store / private responses go upstream every time; untrusted, the policy decides."""
    stub, _ = vendor
    trusting = make_client()
    distrusting = make_client(trust_cache_control=False)
    for directive in ("no-store", "private, max-age=600"):
        vendor_id, path = _ids()
        stub.configure(path, cache_control=directive)
        for _ in range(2):
            assert (
                await trusting.get("availability", path, vendor_id=vendor_id)
            ).cache_status == "MISS"
        assert stub.calls[path] == 2
        assert (
            await distrusting.get("availability", path, vendor_id=vendor_id)
        ).cache_status == "MISS"
        assert (
            await distrusting.get("availability", path, vendor_id=vendor_id)
        ).cache_status == "HIT"


async def test_entries_are_indexed_under_their_tags_with_a_ttl_past_staleness(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory, region_redis: dict[str, Redis]
) -> None:
    """The entry key is in the vendor, vendor+api and wedding tag sets, and Redis keeps it for fresh + max stale."""
    stub, _ = vendor
    vendor_id, path = _ids()
    wedding_id = f"w-{uuid.uuid4().hex[:8]}"
    stub.configure(path, cache_control="max-age=30")
    client = make_client(max_stale_s=120)
    await client.get("availability", path, vendor_id=vendor_id, wedding_id=wedding_id)
    key = client.cache_key("availability", path, vendor_id=vendor_id)
    redis = region_redis[REGION]
    for tag in (
        f"vendor-api:{vendor_id}",
        f"vendor-api:{vendor_id}:availability",
        f"wedding:{wedding_id}",
    ):
        assert await redis.smembers(keys.tag_index(tag)) == {key.encode()}
        assert await redis.ttl(keys.tag_index(tag)) >= 140
    assert 140 <= await redis.ttl(key) <= 150


async def test_a_purge_during_a_fetch_keeps_its_result_out_of_the_cache(
    vendor: tuple[VendorApiStub, str], make_client: ClientFactory, settings: Settings
) -> None:
    """A fetch that started before a purge must not store what it fetched afterwards."""
    stub, _ = vendor
    vendor_id, path = _ids()
    stub.configure(path, delay_s=0.5)
    client = make_client()
    in_flight = asyncio.create_task(client.get("availability", path, vendor_id=vendor_id))

    async def asked() -> bool:
        return stub.calls[path] == 1

    await eventually(asked, what="the vendor was not called")
    sink = RedisSink(REGION, settings.region_redis_urls[REGION])
    sink.add(_purge(tags=(f"vendor-api:{vendor_id}",)))
    await sink.flush()
    await sink.close()

    answer = await in_flight
    assert answer.cache_status == "MISS"  # the caller still gets the vendor's answer
    assert (
        await client.store.get(client.cache_key("availability", path, vendor_id=vendor_id)) is None
    )


def _purge(**targets: Any) -> PurgeCommand:
    now = int(time.time() * 1000)
    return PurgeCommand(
        command_id=uuid.uuid4().hex,
        origin_event_id=uuid.uuid4().hex,
        origin_event_type="vendor.updated",
        origin_occurred_at=now,
        region=REGION,
        entity="vendor:test",
        version=now,
        issued_at=now,
        scope="vendor",
        **targets,
    )


async def _publish(settings: Settings, event_type: str, **fields: Any) -> None:
    publisher = EventPublisher(settings)
    await publisher.start()
    try:
        await publisher.publish(event_type, new_event(event_type, **fields))
    finally:
        await publisher.stop()


async def _start_pipeline(
    settings: Settings, run_roles_bg: Callable[[list[Any]], Awaitable[asyncio.Event]]
) -> None:
    sinks = [SinkRole(settings, RedisSink(r, u)) for r, u in settings.region_redis_urls.items()]
    await run_roles_bg([MapperRole(settings), *sinks])


async def test_vendor_updated_on_kafka_sends_the_next_call_upstream_in_every_region(
    vendor: tuple[VendorApiStub, str],
    make_client: ClientFactory,
    settings: Settings,
    topics: list[str],
    run_roles_bg: Callable[[list[Any]], Awaitable[asyncio.Event]],
) -> None:
    """vendor.updated -> mapper -> Redis sink in each region purges vendor-api:{vendor}: the next call is a MISS."""
    stub, _ = vendor
    vendor_id, path = _ids()
    clients = {region: make_client(region) for region in settings.region_redis_urls}
    for client in clients.values():
        assert (await client.get("availability", path, vendor_id=vendor_id)).cache_status == "MISS"
        assert (await client.get("availability", path, vendor_id=vendor_id)).cache_status == "HIT"
    assert stub.calls[path] == len(clients)

    await _start_pipeline(settings, run_roles_bg)
    await _publish(
        settings,
        "vendor.updated",
        vendor_id=vendor_id,
        category="photographer",
        changed_fields=["prices"],
    )

    async def purged_everywhere() -> bool:
        for client in clients.values():
            if await client.store.get(client.cache_key("availability", path, vendor_id=vendor_id)):
                return False
        return True

    await eventually(purged_everywhere, what="vendor API entries still cached in some region")
    for region, client in clients.items():
        answer = await client.get("availability", path, vendor_id=vendor_id)
        assert answer.cache_status == "MISS", region
    assert stub.calls[path] == 2 * len(clients)


async def test_vendor_api_changed_purges_that_vendors_entries_only(
    vendor: tuple[VendorApiStub, str],
    make_client: ClientFactory,
    settings: Settings,
    topics: list[str],
    run_roles_bg: Callable[[list[Any]], Awaitable[asyncio.Event]],
) -> None:
    """vendor_api.changed purges that vendor's entries of that API only; its other APIs and other vendors' stay."""
    vendor_id, path = _ids()
    bystander, bystander_path = _ids()
    reviews_path = f"/vendors/{vendor_id}/reviews"
    client = make_client()
    await client.get("availability", path, vendor_id=vendor_id)
    await client.get("reviews", reviews_path, vendor_id=vendor_id)
    await client.get("availability", bystander_path, vendor_id=bystander)

    await _start_pipeline(settings, run_roles_bg)
    await _publish(
        settings, "vendor_api.changed", vendor_id=vendor_id, api="availability", resource=None
    )

    async def availability_purged() -> bool:
        return (
            await client.store.get(client.cache_key("availability", path, vendor_id=vendor_id))
            is None
        )

    await eventually(availability_purged, what="availability entry still cached")
    assert (await client.get("availability", path, vendor_id=vendor_id)).cache_status == "MISS"
    assert (
        await client.get("availability", bystander_path, vendor_id=bystander)
    ).cache_status == "HIT"
    assert (await client.get("reviews", reviews_path, vendor_id=vendor_id)).cache_status == "HIT"


async def test_redis_down_bypasses_the_cache(vendor: tuple[VendorApiStub, str]) -> None:
    """With its Redis unreachable the client still answers, straight from the vendor (BYPASS)."""
    stub, base_url = vendor
    vendor_id, path = _ids()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with VendorApiClient(
        {"availability": VendorApiPolicy(base_url=base_url)}, dead
    ) as client:
        answers = [await client.get("availability", path, vendor_id=vendor_id) for _ in range(2)]
    assert [a.cache_status for a in answers] == ["BYPASS", "BYPASS"]
    assert stub.calls[path] == 2


async def test_metrics_per_integration(
    vendor: tuple[VendorApiStub, str], settings: Settings, metric_reader: Any
) -> None:
    """Hits, misses, 304 revalidations, stale answers, upstream errors and latency, by `api`."""
    stub, base_url = vendor
    api = f"metrics-{uuid.uuid4().hex[:8]}"
    vendor_id, path = _ids()
    stub.configure(path, cache_control="max-age=10")
    clock = FakeClock()
    policy = VendorApiPolicy(base_url=base_url, stale_while_revalidate_s=0, max_stale_s=300)
    async with VendorApiClient(
        {api: policy}, settings.region_redis_urls[REGION], clock=clock
    ) as client:
        statuses = [(await client.get(api, path, vendor_id=vendor_id)).cache_status]
        clock.advance(1)
        statuses.append((await client.get(api, path, vendor_id=vendor_id)).cache_status)
        clock.advance(30)
        statuses.append((await client.get(api, path, vendor_id=vendor_id)).cache_status)
        stub.configure(path, fail="503")
        clock.advance(30)
        statuses.append((await client.get(api, path, vendor_id=vendor_id)).cache_status)
    assert statuses == ["MISS", "HIT", "REVALIDATED", "STALE"]

    def total(name: str, **attrs: str) -> float:
        want = {"api": api, **attrs}
        points = metric_points(metric_reader, name)
        return sum(
            getattr(p, "value", None) or getattr(p, "count", 0)
            for p in points
            if all(p.attributes.get(k) == v for k, v in want.items())
        )

    assert total("cachesync.vendor_api.hits") == 1
    assert total("cachesync.vendor_api.misses") == 3
    assert total("cachesync.vendor_api.revalidations", outcome="not_modified") == 1
    assert total("cachesync.vendor_api.stale_served", reason="upstream_error") == 1
    assert total("cachesync.vendor_api.upstream.errors", error="unavailable") == 1
    assert total("cachesync.vendor_api.upstream.latency") == 3  # one per upstream call
