"""Commands re-read after a crash before the commit: applied once, however late they come back,
and audited as applied.

A sink role is killed between its effect and its commit (its flush hangs after the
effect, then the loop is cancelled: tests/integrations/caching/crashes.py) and started
again. The oracles are the caches themselves (the region's Redis, the Cloudflare
stand-in's ledger of accepted purges) and the audit topic, read back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
import stamina
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand, command_id
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.trace import read_trace
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.topology.model import CdnPolicy
from tests.integrations.caching.conftest import CloudflareApi
from tests.integrations.caching.crashes import (
    audit_records,
    committed_offsets,
    dies_after_flush,
    kill,
    own_topics,
    run_until_committed,
    run_until_hung,
    send_commands,
)

EU = "eu-west"


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


def purge(run: str, i: int, **fields: tuple[str, ...]) -> PurgeCommand:
    """Issued long ago (0), so no sink waits on an earlier tier for it."""
    event = f"ev-{run}-{i}"
    return PurgeCommand(
        command_id=command_id(event, EU, "purge"),
        origin_event_id=event,
        origin_event_type="photo.updated",
        origin_occurred_at=0,
        region=EU,
        entity=f"wedding:w-{run}-{i}",
        version=1,
        issued_at=0,
        scope="photo",
        **fields,
    )


async def test_a_redis_batch_reread_after_its_markers_expired_is_not_applied_again(
    settings: Settings, region_redis: dict[str, Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed before the commit and back after its applied markers expired (as a region back
    after a day): the re-read commands are skipped by their partitions' applied offsets, so
    what the platform cached again after the real purge survives; one offset key per
    partition, whatever the number of commands."""
    monkeypatch.setattr(keys, "APPLIED_TTL_S", 1)  # a day, in a second
    redis = region_redis[EU]
    own = await own_topics(settings, "redeliver-redis")
    run = uuid.uuid4().hex[:8]
    commands = [purge(run, i, keys=(f"redeliver:{run}:{i}",)) for i in range(40)]
    for command in commands:
        await cache_put(redis, command.keys[0], b"stale")
    await send_commands(own, commands)
    url = own.region_redis_urls[EU]

    dying = SinkRole(own, dies_after_flush(RedisSink)(EU, url))
    await kill(dying, await run_until_hung(dying))
    first = set(dying.sink.flushed)  # type: ignore[attr-defined]
    assert first, "the dying sink applied nothing"
    group, topic = own.group_id("sink", EU, "redis"), own.commands_topic(EU)
    assert await committed_offsets(own, group, topic) == 0, "committed before the kill"
    # The platform caches the purged pages again; then the markers expire.
    refilled = [c.keys[0] for c in commands if c.command_id in first]
    for key in refilled:
        await cache_put(redis, key, b"fresh-after-the-purge")
    await asyncio.sleep(2.2)
    markers = [keys.applied("redis", c) for c in first]
    assert await redis.exists(*markers) == 0, "the applied markers did not expire"

    await run_until_committed(SinkRole(own, RedisSink(EU, url)), len(commands))

    assert [await redis.get(k) for k in refilled] == [b"fresh-after-the-purge"] * len(refilled), (
        "a command applied before the crash was applied again"
    )
    rest = [c.keys[0] for c in commands if c.command_id not in first]
    assert not rest or await redis.exists(*rest) == 0, "commands after the crash not applied"
    # What covers the retention is one key per partition, however many commands.
    pattern = keys.APPLIED_OFFSET.format(sink="redis", topic=topic, partition="*")
    assert 0 < len(await redis.keys(pattern)) <= 6


async def test_a_cloudflare_batch_reread_after_its_markers_expired_is_not_purged_again(
    settings: Settings, cloudflare_api: CloudflareApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a CDN sink, whose records are written through the ledger after the
    provider acknowledged: Cloudflare's own ledger shows every tag purged exactly once."""
    monkeypatch.setattr(keys, "APPLIED_TTL_S", 1)
    own = await own_topics(settings, "redeliver-cf")
    run = uuid.uuid4().hex[:8]
    zone = f"zone-{run}"
    commands = [purge(run, i, tags=(f"tag-{run}-{i}",)) for i in range(30)]
    await send_commands(own, commands)

    def sink(cls: type[CloudflareSink]) -> CloudflareSink:
        return cls(
            EU,
            zone=zone,
            token=SecretStr(cloudflare_api.token),
            public_url="https://eu.weddings.example",
            redis=own.region_redis_urls[EU],
            policy=CdnPolicy(window_ms=200),
            api_url=cloudflare_api.url,
        )

    dying = SinkRole(own, sink(dies_after_flush(CloudflareSink)))
    await kill(dying, await run_until_hung(dying))
    first = set(dying.sink.flushed)  # type: ignore[attr-defined]
    assert first, "the dying sink purged nothing"
    await asyncio.sleep(2.2)  # its markers expire

    await run_until_committed(SinkRole(own, sink(CloudflareSink)), len(commands))

    purged = Counter(t for call in cloudflare_api.stub.applied(zone) for t in call.items)
    assert purged == Counter(c.tags[0] for c in commands), "a tag purged twice, or not at all"


async def test_a_command_applied_before_a_crash_is_audited_as_applied(
    settings: Settings, region_redis: dict[str, Redis]
) -> None:
    """Killed after the effect and before its audit records and commit: after the restart the
    audit topic has an "applied" record for every command (the redelivered ones saying when
    they were applied), and `trace` shows each of them applied."""
    redis = region_redis[EU]
    own = await own_topics(settings, "audit-crash")
    since = int(time.time() * 1000) - 1000
    run = uuid.uuid4().hex[:8]
    commands = [purge(run, i, keys=(f"audit:{run}:{i}",)) for i in range(30)]
    for command in commands:
        await cache_put(redis, command.keys[0], b"stale")
    await send_commands(own, commands)
    url = own.region_redis_urls[EU]

    dying = SinkRole(own, dies_after_flush(RedisSink)(EU, url))
    await kill(dying, await run_until_hung(dying))
    killed_at = int(time.time() * 1000)
    first = set(dying.sink.flushed)  # type: ignore[attr-defined]
    assert first, "the dying sink applied nothing"
    await run_until_committed(SinkRole(own, RedisSink(EU, url)), len(commands))

    records = [r for r in await audit_records(own, since) if r.stage == "sink"]
    outcomes = {r.command_id: r for r in records}
    assert set(outcomes) == {c.command_id for c in commands}
    for command in commands:
        record = outcomes[command.command_id]
        assert (record.outcome, record.sink, record.region) == ("applied", "redis", EU), record
        if command.command_id in first:
            # When the first delivery applied it, from its marker: before the kill.
            assert record.detail.startswith("redelivered; applied at "), record.detail
            at = dt.datetime.fromisoformat(record.detail.rsplit(" ", 1)[1])
            assert since <= at.timestamp() * 1000 <= killed_at, record.detail

    for command in (
        commands[:: max(1, len(commands) // 6)] + [c for c in commands if c.command_id in first][:5]
    ):
        view = await read_trace(own, command.origin_event_id, since_ms=since)
        assert view.commands[command.command_id].sinks["redis"].outcome == "applied"
        assert view.pending(lambda region, kind: ["redis"]) == []
