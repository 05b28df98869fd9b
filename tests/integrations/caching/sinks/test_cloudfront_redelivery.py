"""CloudFront after a crash before the commit: a window re-read with one more record is not a
second invalidation of the first window's paths.

A CloudFront sink role flushes a window of N commands and is killed before its commit
(tests/integrations/caching/crashes.py); one more command arrives; the restarted role
re-reads the N with it. What was invalidated is asked of moto (ListInvalidations /
GetInvalidation): each of the N + 1 paths exactly once, the N in one invalidation.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aioboto3
import pytest
import stamina
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand, command_id
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.cloudfront import CloudFrontSink
from cachesync.topology.model import CdnPolicy, CloudFrontPolicy
from tests.integrations.caching.crashes import (
    dies_after_flush,
    kill,
    own_topics,
    run_until_committed,
    run_until_hung,
    send_commands,
)

EU = "eu-west"
N = 12
# A short window, so a test does not wait CloudFront's 10 s one.
POLICY = CdnPolicy(window_ms=200, cloudfront=CloudFrontPolicy(window_ms=300))


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


def purge(run: str, i: int) -> PurgeCommand:
    """One path per command; one entity for all, so they are one partition, in order.
    Issued long ago (0): the sink does not wait on the region's Redis sink for them."""
    event = f"ev-{run}-{i}"
    return PurgeCommand(
        command_id=command_id(event, EU, "purge"),
        origin_event_id=event,
        origin_event_type="photo.updated",
        origin_occurred_at=0,
        region=EU,
        entity=f"wedding:w-{run}",
        version=i,
        issued_at=0,
        scope="photo",
        urls=(f"/weddings/w-{run}/photos/p{i}.jpg",),
    )


def make(cls: type[CloudFrontSink], own: Settings, endpoint: str, distribution: str) -> Any:
    return cls(
        EU,
        distribution=distribution,
        redis=own.region_redis_urls[EU],
        policy=POLICY,
        endpoint_url=endpoint,
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
    )


async def invalidated(endpoint: str, distribution: str) -> list[tuple[str, ...]]:
    """The paths of every invalidation moto holds for the distribution."""
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    async with session.client("cloudfront", endpoint_url=endpoint) as client:
        listed = await client.list_invalidations(DistributionId=distribution)
        found = []
        for item in listed["InvalidationList"].get("Items", []):
            inv = await client.get_invalidation(DistributionId=distribution, Id=item["Id"])
            found.append(tuple(sorted(inv["Invalidation"]["InvalidationBatch"]["Paths"]["Items"])))
        return found


async def _first_window(own: Settings, endpoint: str, distribution: str, run: str) -> set[str]:
    """Runs a role whose sink dies after its first flush; the paths of that window."""
    first = [purge(run, i) for i in range(N)]
    await send_commands(own, first)
    dying = SinkRole(own, make(dies_after_flush(CloudFrontSink), own, endpoint, distribution))
    await kill(dying, await run_until_hung(dying))
    [window] = await invalidated(endpoint, distribution)
    return set(window)


async def _check_once_each(
    own: Settings, endpoint: str, distribution: str, run: str, window: set[str]
) -> None:
    """One more command, the restarted role re-reads all: every path invalidated once."""
    await send_commands(own, [purge(run, N)])
    restarted = SinkRole(own, make(CloudFrontSink, own, endpoint, distribution))
    await run_until_committed(restarted, N + 1)
    made = await invalidated(endpoint, distribution)
    every = {c.urls[0] for c in (purge(run, i) for i in range(N + 1))}
    assert Counter(p for paths in made for p in paths) == Counter(every), (
        f"a path invalidated twice (or never): {made}"
    )
    assert tuple(sorted(window)) in made and len(made) == 2, made


async def test_a_window_reread_with_one_more_record_after_a_crash_is_not_a_second_invalidation(
    settings: Settings, cloudfront_endpoint: str, distribution: str
) -> None:
    """Killed after its invalidation was made and recorded, before the commit, and back after
    the applied markers expired (as after a day): the N are skipped by their partition's
    applied offset, and only the new command is a new invalidation."""
    own = await own_topics(settings, "cf-redeliver")
    run = uuid.uuid4().hex[:8]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keys, "APPLIED_TTL_S", 1)
        window = await _first_window(own, cloudfront_endpoint, distribution, run)
        await asyncio.sleep(2.2)  # the markers expire
    assert len(window) == N
    await _check_once_each(own, cloudfront_endpoint, distribution, run, window)


async def test_a_window_whose_record_was_lost_is_regrouped_under_its_reference(
    settings: Settings,
    cloudfront_endpoint: str,
    distribution: str,
    region_redis: dict[str, Redis],
) -> None:
    """Killed after CloudFront made the invalidation and before the commands were recorded as
    applied (no markers, no applied offset): the re-read batch of N + 1 regroups the N under
    the first invalidation's reference, and only the new command is a new invalidation."""
    own = await own_topics(settings, "cf-unrecorded")
    run = uuid.uuid4().hex[:8]
    await send_commands(own, [purge(run, i) for i in range(N)])
    sink = make(CloudFrontSink, own, cloudfront_endpoint, distribution)
    hung = asyncio.Event()

    async def killed_while_recording(*args: Any, **kwargs: Any) -> None:
        hung.set()
        await asyncio.Event().wait()

    sink.ledger.record = killed_while_recording
    dying = SinkRole(own, sink)
    await dying.start()
    task = asyncio.create_task(dying.loop.run(asyncio.Event()))
    await asyncio.wait_for(hung.wait(), timeout=30)
    await kill(dying, task)
    [window] = await invalidated(cloudfront_endpoint, distribution)
    markers = [keys.applied("cloudfront", purge(run, i).command_id) for i in range(N)]
    assert await region_redis[EU].exists(*markers) == 0, "the record was not lost"

    await _check_once_each(own, cloudfront_endpoint, distribution, run, set(window))
