"""The Redis sink's purge script against a region's real Redis: skip, fence, markers, purge.

Every test uses its own key names (a fresh run id), so tests never see each other's
keys; the oracle is Redis itself (GET / EXISTS / TTL / SMEMBERS), not FlushResult.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks import redis as redis_sink
from cachesync.consumers.sinks.base import FlushResult, Position
from cachesync.consumers.sinks.redis import RedisSink

REGION = "eu-west"


def purge(
    run: str, n: int, *, entity: str, version: int, **fields: tuple[str, ...]
) -> PurgeCommand:
    """A purge of this test run: its own command id and event id per `n`."""
    return PurgeCommand(
        command_id=f"cmd-{run}-{n}",
        origin_event_id=f"ev-{run}-{n}",
        origin_event_type="photo.updated",
        origin_occurred_at=version,
        region=REGION,
        entity=entity,
        version=version,
        issued_at=version,
        scope="wedding",
        **fields,
    )


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def redis(region_redis: dict[str, Redis]) -> Redis:
    return region_redis[REGION]


@pytest.fixture
async def sink(settings: Settings) -> AsyncIterator[RedisSink]:
    sink = RedisSink(REGION, settings.region_redis_urls[REGION])
    await sink.setup()
    yield sink
    await sink.close()


async def apply(sink: RedisSink, *commands: PurgeCommand) -> None:
    for command in commands:
        assert sink.accepts(command)
        sink.add(command)
    await sink.flush()


async def test_a_redelivered_command_does_not_delete_what_was_cached_again(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """A command whose applied marker exists is skipped: keys and tag members re-cached after it survive."""
    key = f"wedding:{run}:gallery"
    tag = f"wedding:{run}"
    member = f"wedding:{run}:photo:1"
    await redis.set(key, "old")
    await redis.set(member, "old")
    await redis.sadd(keys.tag_index(tag), member)
    command = purge(run, 1, entity=f"wedding:{run}", version=100, keys=(key,), tags=(tag,))

    await apply(sink, command)
    assert await redis.exists(key, member, keys.tag_index(tag)) == 0

    # The platform caches them again after the real purge; then the command comes back.
    await redis.set(key, "fresh")
    await redis.set(member, "fresh")
    await redis.sadd(keys.tag_index(tag), member)
    await apply(sink, command)

    assert await redis.get(key) == b"fresh"
    assert await redis.get(member) == b"fresh"
    assert await redis.smembers(keys.tag_index(tag)) == {member.encode()}


async def test_the_purge_version_per_entity_only_grows_and_no_url_is_fenced(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """An older purge never lowers an entity's purge version; a newer one raises it. URLs
    get no fence here: warms are fenced by their region's front tier, which is never Redis."""
    entity = f"wedding:{run}"
    url = f"/weddings/{run}/gallery"
    entity_fence = keys.purge_version(RedisSink.kind, entity)
    url_fence = keys.purge_version(RedisSink.kind, keys.url_target(url))

    await apply(sink, purge(run, 1, entity=entity, version=200, urls=(url,)))
    assert await redis.get(entity_fence) == b"200"

    # An older command (another event, applied later) in its own flush, then in one flush
    # after a newer one: neither lowers the record.
    await apply(sink, purge(run, 2, entity=entity, version=100, urls=(url,)))
    assert await redis.get(entity_fence) == b"200"
    await apply(
        sink,
        purge(run, 3, entity=entity, version=300, urls=(url,)),
        purge(run, 4, entity=entity, version=250, urls=(url,)),
    )
    assert await redis.get(entity_fence) == b"300"
    assert 0 < await redis.ttl(entity_fence) <= keys.PURGE_VERSION_TTL_S
    assert await redis.exists(url_fence) == 0


async def test_an_older_purge_still_refreshes_the_fence_ttl(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """An older purge keeps the fence's value but renews its TTL to PURGE_VERSION_TTL_S."""
    entity = f"wedding:{run}"
    fence = keys.purge_version(RedisSink.kind, entity)
    await apply(sink, purge(run, 1, entity=entity, version=500))
    await redis.expire(fence, 60)

    await apply(sink, purge(run, 2, entity=entity, version=400))

    assert await redis.get(fence) == b"500"
    assert await redis.ttl(fence) > keys.PURGE_VERSION_TTL_S - 60


async def test_applied_markers_per_command_and_per_event_exist_with_a_ttl(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """After flush, each command's and each origin event's applied marker exist, expiring within APPLIED_TTL_S."""
    with_keys = purge(run, 1, entity=f"wedding:{run}", version=1, keys=(f"wedding:{run}:page",))
    # A purge with nothing for Redis still gets its markers: the edges and warmer wait on them.
    empty = purge(run, 2, entity=f"wedding:{run}", version=2)
    assert not await redis.exists(
        keys.applied(RedisSink.kind, with_keys.command_id),
        keys.applied_event(RedisSink.kind, with_keys.origin_event_id),
    )

    await apply(sink, with_keys, empty)

    for command in (with_keys, empty):
        markers = [
            keys.applied(RedisSink.kind, command.command_id),
            keys.applied_event(RedisSink.kind, command.origin_event_id),
        ]
        for marker in markers:
            assert await redis.exists(marker) == 1, marker
            assert 0 < await redis.ttl(marker) <= keys.APPLIED_TTL_S, marker


async def test_the_purge_deletes_its_keys_and_every_tag_member_with_the_tag_set(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """Named keys, the members of each purged tag and the tag sets are deleted; nothing else is."""
    purged_keys = [f"wedding:{run}:gallery", f"wedding:{run}:guests"]
    tags = [f"wedding:{run}", f"vendor-api:{run}"]
    members = {
        tags[0]: [f"wedding:{run}:photo:{i}" for i in range(3)],
        tags[1]: [f"cachesync:vendor-api:prices:{run}:d{i}" for i in range(2)],
    }
    bystander = f"wedding:{run}:other"
    other_tag = f"wedding:{run}-other"
    other_member = f"wedding:{run}-other:photo:1"
    for key in [*purged_keys, bystander, other_member, *members[tags[0]], *members[tags[1]]]:
        await redis.set(key, "cached")
    for tag, names in members.items():
        await redis.sadd(keys.tag_index(tag), *names)
    await redis.sadd(keys.tag_index(other_tag), other_member)

    await apply(
        sink,
        purge(
            run, 1, entity=f"wedding:{run}", version=1, keys=tuple(purged_keys), tags=tuple(tags)
        ),
    )

    gone = [*purged_keys, *members[tags[0]], *members[tags[1]], *map(keys.tag_index, tags)]
    for key in gone:
        assert await redis.exists(key) == 0, key
    assert await redis.get(bystander) == b"cached"
    assert await redis.get(other_member) == b"cached"
    assert await redis.smembers(keys.tag_index(other_tag)) == {other_member.encode()}


async def test_a_tag_with_more_members_than_one_del_call_is_purged_whole(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """A tag index larger than the script's 500-member DEL chunk has every member deleted."""
    tag = f"wedding:{run}"
    members = [f"wedding:{run}:photo:{i}" for i in range(1_234)]
    await redis.mset(dict.fromkeys(members, "cached"))
    await redis.sadd(keys.tag_index(tag), *members)

    await apply(sink, purge(run, 1, entity=tag, version=1, tags=(tag,)))

    assert await redis.exists(*members) == 0
    assert await redis.exists(keys.tag_index(tag)) == 0


async def apply_read(sink: RedisSink, *read: tuple[PurgeCommand, Position]) -> FlushResult:
    """As the runner does: where each command was read, then the command, then one flush."""
    for command, position in read:
        sink.read_from(command, position)
        sink.add(command)
    return await sink.flush()


async def test_a_record_the_partition_offset_covers_is_skipped_without_its_marker(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """Markers gone (they live minutes), a record at or below its partition's applied offset
    is still skipped, and said applied at or before the time the offset was recorded."""
    topic = f"cmds-{run}"
    key = f"wedding:{run}:gallery"
    first, second = (purge(run, n, entity=f"wedding:{run}", version=n, keys=(key,)) for n in (1, 2))
    await redis.set(key, "old")
    await apply_read(
        sink, (first, Position(topic, 3, 10, 1_000)), (second, Position(topic, 3, 11, 1_001))
    )
    offsets = keys.applied_offset(RedisSink.kind, topic, 3)
    assert await redis.hmget(offsets, "offset", "record_ts") == [b"11", b"1001"]
    assert 0 < await redis.ttl(offsets) <= keys.APPLIED_OFFSET_TTL_S
    await redis.delete(*(keys.applied(RedisSink.kind, c.command_id) for c in (first, second)))

    await redis.set(key, "fresh")
    result = await apply_read(sink, (first, Position(topic, 3, 10, 1_000)))

    assert await redis.get(key) == b"fresh"
    note = result.notes[first.command_id]
    assert note.outcome == "applied" and note.detail.startswith(
        "redelivered; applied at or before "
    )
    assert await redis.hmget(offsets, "offset") == [b"11"]


async def test_a_record_newer_than_any_applied_is_applied_whatever_its_offset(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """A topic deleted and made again starts its offsets at 0: its records are newer than any
    applied, so they are applied, and the partition's offset starts again from them."""
    topic = f"cmds-{run}"
    key = f"wedding:{run}:gallery"
    await apply_read(sink, (purge(run, 1, entity=key, version=1), Position(topic, 0, 500, 1_000)))
    await redis.set(key, "old")

    remade = purge(run, 2, entity=key, version=2, keys=(key,))
    result = await apply_read(sink, (remade, Position(topic, 0, 0, 2_000)))

    assert result.applied == 1 and await redis.exists(key) == 0
    offsets = keys.applied_offset(RedisSink.kind, topic, 0)
    assert await redis.hmget(offsets, "offset", "record_ts") == [b"0", b"2000"]


async def test_a_copy_at_another_offset_is_skipped_by_its_marker_and_moves_the_offset(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """The same command at a later offset (a re-drive, a mirror's duplicate): skipped by its
    marker, said applied at the marker's time, and its offset is covered from then on."""
    topic = f"cmds-{run}"
    key = f"wedding:{run}:gallery"
    command = purge(run, 1, entity=key, version=1, keys=(key,))
    await apply_read(sink, (command, Position(topic, 1, 7, 1_000)))
    applied_at = int(await redis.get(keys.applied(RedisSink.kind, command.command_id)))
    await redis.set(key, "fresh")

    result = await apply_read(sink, (command, Position(topic, 1, 42, 1_500)))

    assert result.applied == 0 and await redis.get(key) == b"fresh"
    stamp = dt.datetime.fromtimestamp(applied_at / 1000, dt.UTC).isoformat(timespec="milliseconds")
    assert result.notes[command.command_id].detail == f"redelivered; applied at {stamp[:-6]}Z"
    offsets = keys.applied_offset(RedisSink.kind, topic, 1)
    assert await redis.hmget(offsets, "offset", "record_ts") == [b"42", b"1500"]


async def test_a_flush_applies_all_its_commands_in_one_script_call(
    sink: RedisSink, redis: Redis, run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty purges in one flush: one EVALSHA, and every key, marker and offset is written."""
    calls: list[object] = []
    evalsha = sink.redis.evalsha

    async def counted(*args: object) -> object:
        calls.append(args[0])
        return await evalsha(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sink.redis, "evalsha", counted)
    topic = f"cmds-{run}"
    commands = [
        purge(run, n, entity=f"wedding:{run}-{n}", version=n, keys=(f"wedding:{run}-{n}:page",))
        for n in range(40)
    ]
    for command in commands:
        await redis.set(command.keys[0], "old")

    result = await apply_read(
        sink, *((c, Position(topic, 0, n, 1_000 + n)) for n, c in enumerate(commands))
    )

    assert len(calls) == 1
    assert result.applied == 40
    assert await redis.exists(*(c.keys[0] for c in commands)) == 0
    assert await redis.exists(*(keys.applied(RedisSink.kind, c.command_id) for c in commands)) == 40
    offsets = keys.applied_offset(RedisSink.kind, topic, 0)
    assert await redis.hmget(offsets, "offset", "record_ts") == [b"39", b"1039"]


async def test_a_flush_cut_into_several_calls_applies_them_in_order(
    sink: RedisSink, redis: Redis, run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut at a few keys per call: every purge is applied, a copy of a command in a later call
    is skipped by the marker an earlier call wrote, fences and offsets end at the newest."""
    monkeypatch.setattr(redis_sink, "MAX_KEYS_PER_CALL", 8)
    topic = f"cmds-{run}"
    entity = f"wedding:{run}"
    commands = [
        purge(run, n, entity=entity, version=v, keys=(f"wedding:{run}:k{n}",))
        for n, v in enumerate([500, 700, 600, 300, 650])
    ]
    for command in commands:
        await redis.set(command.keys[0], "old")
    read = [(c, Position(topic, 2, 100 + n, 5_000 + n)) for n, c in enumerate(commands)]
    # The first command again, at a later offset (a mirror's duplicate), in the last call.
    read.append((commands[0], Position(topic, 2, 105, 5_005)))
    assert len(redis_sink._calls("redis", REGION, [c for c, _ in read], {}, 0)) > 2

    result = await apply_read(sink, *read)

    assert result.applied == 5
    assert await redis.exists(*(c.keys[0] for c in commands)) == 0
    assert await redis.get(keys.purge_version(RedisSink.kind, entity)) == b"700"
    offsets = keys.applied_offset(RedisSink.kind, topic, 2)
    assert await redis.hmget(offsets, "offset", "record_ts") == [b"105", b"5005"]


async def test_one_flush_skips_a_covered_record_and_applies_the_next(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """A flush that re-reads an applied record (markers gone) and reads a new one after it:
    the first is skipped (what was cached again survives), the second applied."""
    topic = f"cmds-{run}"
    old_key, new_key = f"wedding:{run}:old", f"wedding:{run}:new"
    first = purge(run, 1, entity=f"wedding:{run}", version=1, keys=(old_key,))
    second = purge(run, 2, entity=f"wedding:{run}", version=2, keys=(new_key,))
    await apply_read(sink, (first, Position(topic, 4, 30, 3_000)))
    await redis.delete(keys.applied(RedisSink.kind, first.command_id))
    await redis.set(old_key, "fresh")
    await redis.set(new_key, "old")

    result = await apply_read(
        sink, (first, Position(topic, 4, 30, 3_000)), (second, Position(topic, 4, 31, 3_001))
    )

    assert (result.applied, result.skipped) == (1, 1)
    assert await redis.get(old_key) == b"fresh"
    assert await redis.exists(new_key) == 0
    assert result.notes[first.command_id].detail.startswith("redelivered; applied at or before ")
    offsets = keys.applied_offset(RedisSink.kind, topic, 4)
    assert await redis.hmget(offsets, "offset", "record_ts") == [b"31", b"3001"]


async def test_a_copy_later_in_the_same_flush_does_not_cover_the_records_between(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """A command read again further on in its own batch (a mirror's duplicate) is applied once,
    and the records between its two copies are applied too, not taken as covered by the
    copy's later offset."""
    topic = f"cmds-{run}"
    twice, a, b = (
        purge(run, n, entity=f"wedding:{run}-{n}", version=n, keys=(f"wedding:{run}:k{n}",))
        for n in (1, 2, 3)
    )
    for command in (twice, a, b):
        await redis.set(command.keys[0], "old")

    result = await apply_read(
        sink,
        (twice, Position(topic, 0, 10, 1_000)),
        (a, Position(topic, 0, 11, 1_001)),
        (b, Position(topic, 0, 12, 1_002)),
        (twice, Position(topic, 0, 13, 1_003)),
    )

    assert result.applied == 3
    assert await redis.exists(twice.keys[0], a.keys[0], b.keys[0]) == 0
    offsets = keys.applied_offset(RedisSink.kind, topic, 0)
    assert await redis.hmget(offsets, "offset", "record_ts") == [b"13", b"1003"]


async def test_a_batch_holding_a_copy_read_again_without_markers_is_skipped_whole(
    sink: RedisSink, redis: Redis, run: str
) -> None:
    """The same batch (a command, another, the first's copy) read again once the markers are
    gone: the partition's offset covers all of it, so nothing cached since is deleted."""
    topic = f"cmds-{run}"
    twice, other = (
        purge(run, n, entity=f"wedding:{run}-{n}", version=n, keys=(f"wedding:{run}:k{n}",))
        for n in (1, 2)
    )
    read = [
        (twice, Position(topic, 5, 20, 2_000)),
        (other, Position(topic, 5, 21, 2_001)),
        (twice, Position(topic, 5, 22, 2_002)),
    ]
    await apply_read(sink, *read)
    await redis.delete(*(keys.applied(RedisSink.kind, c.command_id) for c in (twice, other)))
    await redis.set(twice.keys[0], "fresh")
    await redis.set(other.keys[0], "fresh")

    result = await apply_read(sink, *read)

    assert result.applied == 0
    assert await redis.mget(twice.keys[0], other.keys[0]) == [b"fresh", b"fresh"]


@pytest.mark.parametrize("flushes", ["one flush per part", "all parts in one flush"])
async def test_a_split_purge_counts_as_applied_for_later_tiers_only_at_its_last_part(
    sink: RedisSink, redis: Redis, run: str, flushes: str
) -> None:
    """The edges and the warmer wait for the event's marker: with the parts of one event in
    separate flushes, it appears only when the last part's keys are gone, never between."""
    event = f"ev-{run}-split"
    parts = [
        purge(run, n, entity=f"vendor:{run}", version=100, keys=(f"wedding:{run}-{n}:vendors",))
        for n in range(3)
    ]
    parts = [replace(p, origin_event_id=event, parts_after=2 - n) for n, p in enumerate(parts)]
    for p in parts:
        await redis.set(p.keys[0], "stale")
    marker = keys.applied_event("redis", event)

    if flushes == "one flush per part":
        for n, p in enumerate(parts):
            await apply(sink, p)
            assert await redis.exists(p.keys[0]) == 0
            assert (await redis.exists(marker) == 1) == (n == 2), f"after part {n}"
    else:
        await apply(sink, *parts)
        assert await redis.exists(*(p.keys[0] for p in parts)) == 0
        assert await redis.exists(marker) == 1


@pytest.mark.parametrize("max_keys", [redis_sink.MAX_KEYS_PER_CALL, 8])
async def test_a_flush_loads_the_script_when_the_server_does_not_know_it(
    settings: Settings, redis: Redis, run: str, monkeypatch: pytest.MonkeyPatch, max_keys: int
) -> None:
    """The sink calls its script by digest; a server without it (restarted, scripts flushed)
    gets it loaded, and the flush applies every command (in one call, or in several)."""
    # A script text of this run only, so the server cannot know its digest yet.
    monkeypatch.setattr(redis_sink, "_PURGE_SCRIPT", f"{redis_sink._PURGE_SCRIPT}-- {run}\n")
    monkeypatch.setattr(redis_sink, "MAX_KEYS_PER_CALL", max_keys)
    sink = RedisSink(REGION, settings.region_redis_urls[REGION])
    commands = [
        purge(run, n, entity=f"wedding:{run}-{n}", version=n, keys=(f"wedding:{run}:k{n}",))
        for n in range(3)
    ]
    for command in commands:
        await redis.set(command.keys[0], "old")
    try:
        await apply(sink, *commands)
    finally:
        await sink.close()

    assert await redis.exists(*(c.keys[0] for c in commands)) == 0
    assert await redis.exists(*(keys.applied(RedisSink.kind, c.command_id) for c in commands)) == 3
