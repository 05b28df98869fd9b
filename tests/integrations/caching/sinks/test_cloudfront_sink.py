"""The CloudFront sink's flush against moto (server mode) and the region's Redis.

What was invalidated is asked of moto (ListInvalidations / GetInvalidation), and what
the sink recorded of Redis (markers, fences, batch references), never taken from the
sink's FlushResult alone. Each test gets its own distribution (the `distribution`
fixture), so moto's list holds only that test's invalidations.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aioboto3
import pytest
import stamina
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand, command_id
from cachesync.consumers.errors import SinkMisconfigured, TransientError
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.cloudfront import CloudFrontSink, caller_reference
from cachesync.topology.model import CdnPolicy
from deploy.local.standins.serve import free_port
from tests.conftest import metric_points

EU = "eu-west"
POLICY = CdnPolicy(window_ms=200)


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def redis(region_redis: dict[str, Redis]) -> Redis:
    return region_redis[EU]


def make(settings: Settings, endpoint: str, distribution: str) -> CloudFrontSink:
    return CloudFrontSink(
        EU,
        distribution=distribution,
        redis=settings.region_redis_urls[EU],
        policy=POLICY,
        endpoint_url=endpoint,
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
    )


@pytest.fixture
async def sink(
    settings: Settings, cloudfront_endpoint: str, distribution: str
) -> AsyncIterator[CloudFrontSink]:
    sink = make(settings, cloudfront_endpoint, distribution)
    await sink.setup()
    yield sink
    await sink.close()


def purge(run: str, n: int, *, occurred_at: int | None = None, **fields: Any) -> PurgeCommand:
    event = f"ev-{run}-{n}"
    at = int(time.time() * 1000) if occurred_at is None else occurred_at
    return PurgeCommand(
        command_id=command_id(event, EU, "purge"),
        origin_event_id=event,
        origin_event_type="photo.updated",
        origin_occurred_at=at,
        region=EU,
        entity=f"wedding:w-{run}",
        version=at,
        issued_at=at,
        scope="wedding",
        **fields,
    )


async def invalidations(endpoint: str, distribution: str) -> list[dict[str, Any]]:
    """Every invalidation moto holds for the distribution, with its batch."""
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    async with session.client("cloudfront", endpoint_url=endpoint) as client:
        listed = await client.list_invalidations(DistributionId=distribution)
        return [
            (await client.get_invalidation(DistributionId=distribution, Id=item["Id"]))[
                "Invalidation"
            ]
            for item in listed["InvalidationList"].get("Items", [])
        ]


def paths(invalidation: dict[str, Any]) -> list[str]:
    return sorted(invalidation["InvalidationBatch"]["Paths"]["Items"])


async def test_a_flush_is_one_invalidation_of_the_coalesced_paths_recorded_in_redis(
    sink: CloudFrontSink, cloudfront_endpoint: str, distribution: str, redis: Redis, run: str
) -> None:
    """Three commands, a duplicate URL and a prefix: one invalidation, each path once, the
    prefix as a wildcard, its CallerReference derived from the commands; markers, fences
    and the batch reference in the region's Redis."""
    gallery, album = f"/weddings/w-{run}/gallery", f"/weddings/w-{run}/albums/a1"
    commands = [
        purge(run, 0, urls=(gallery, album)),
        purge(run, 1, urls=(gallery,)),
        purge(run, 2, prefixes=(f"/vendors/v-{run}/",)),
    ]
    for command in commands:
        sink.add(command)
    result = await sink.flush()
    assert result.applied == 3 and not result.rejected

    [made] = await invalidations(cloudfront_endpoint, distribution)
    assert paths(made) == sorted([album, gallery, f"/vendors/v-{run}/*"])
    ref = caller_reference(distribution, [c.command_id for c in commands])
    assert made["InvalidationBatch"]["CallerReference"] == ref
    assert await redis.get(keys.cloudfront_batch(distribution, ref)) == made["Id"].encode()
    for command in commands:
        assert await redis.exists(keys.applied("cloudfront", command.command_id))
        assert await redis.exists(keys.applied_event("cloudfront", command.origin_event_id))
    fence = await redis.get(keys.purge_version("cloudfront", keys.url_target(gallery)))
    assert fence == str(max(c.version for c in commands[:2])).encode()
    assert result.notes[commands[0].command_id].provider_ids == (made["Id"],)


async def test_many_paths_under_one_wedding_become_one_wildcard(
    sink: CloudFrontSink, cloudfront_endpoint: str, distribution: str, run: str
) -> None:
    """40 photo URLs of one wedding (over escalate_paths_over=30): one wildcard covering them."""
    urls = tuple(f"/weddings/w-{run}/photos/p{i}.jpg" for i in range(40))
    sink.add(purge(run, 0, urls=urls))
    assert (await sink.flush()).applied == 1
    [made] = await invalidations(cloudfront_endpoint, distribution)
    [wildcard] = paths(made)
    assert wildcard.endswith("*") and all(u.startswith(wildcard[:-1]) for u in urls)
    assert wildcard.startswith(f"/weddings/w-{run}/")


async def test_a_path_invalidated_after_the_event_happened_is_not_invalidated_again(
    sink: CloudFrontSink, cloudfront_endpoint: str, distribution: str, redis: Redis, run: str
) -> None:
    """A later flush for an older event on the same path is applied without a second call."""
    gallery = f"/weddings/w-{run}/gallery"
    sink.add(purge(run, 0, urls=(gallery,)))
    await sink.flush()
    older = purge(run, 1, urls=(gallery,), occurred_at=int(time.time() * 1000) - 60_000)
    sink.add(older)
    assert (await sink.flush()).applied == 1
    assert len(await invalidations(cloudfront_endpoint, distribution)) == 1
    assert await redis.exists(keys.applied("cloudfront", older.command_id))


async def test_an_unknown_distribution_pauses_the_sink_and_records_nothing(
    settings: Settings, cloudfront_endpoint: str, distribution: str, redis: Redis, run: str
) -> None:
    """A distribution CloudFront does not know (404 NoSuchDistribution) is the sink's
    configuration, not the command's: the batch is put back, nothing is dead-lettered."""
    sink = make(settings, cloudfront_endpoint, f"NOSUCH{run.upper()}")
    await sink.setup()
    command = purge(run, 0, urls=(f"/weddings/w-{run}/gallery",))
    sink.add(command)
    with pytest.raises(SinkMisconfigured, match="NoSuchDistribution"):
        await sink.flush()
    await sink.close()
    assert not await redis.exists(keys.applied("cloudfront", command.command_id))
    assert await invalidations(cloudfront_endpoint, distribution) == []


async def test_cloudfront_unreachable_is_transient_after_counted_retries(
    settings: Settings, metric_reader: Any, redis: Redis, run: str
) -> None:
    """No answer at all: the call is retried (counted per sink) and then the batch is put back."""

    def retries() -> float:
        points = metric_points(metric_reader, "cachesync.sink.retries")
        return sum(p.value for p in points if p.attributes.get("sink") == "cloudfront")

    before = retries()
    sink = make(settings, f"http://127.0.0.1:{free_port()}", "DOWN")
    await sink.setup()
    command = purge(run, 0, urls=(f"/weddings/w-{run}/gallery",))
    sink.add(command)
    with pytest.raises(TransientError, match="EndpointConnectionError after 3 attempts"):
        await sink.flush()
    await sink.close()
    assert retries() - before == 2
    assert not await redis.exists(keys.applied("cloudfront", command.command_id))
