"""The benchmark's ceilings do the pipeline's work, like for like (bench/CEILINGS.md)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from bench import harness, worker
from bench.common import World, encode_events, produce_all
from cachesync.consumers import keys
from cachesync.consumers.pipeline.codecs import codec_for
from cachesync.consumers.pipeline.roles import MapperRole
from cachesync.consumers.settings import Settings

EVENTS = 300


@pytest.fixture
async def bench_run(settings: Settings) -> AsyncIterator[tuple[str, harness.Topics]]:
    """A bench run's tag and topics (on the session's services), deleted afterwards with the
    relationship index its events left in the state Redis."""
    run = uuid.uuid4().hex[:8]
    topics = harness.Topics(settings.kafka_bootstrap_servers)
    yield run, topics
    await topics.delete_all()
    state = Redis.from_url(str(settings.state_redis_url))
    try:
        left = [k async for k in state.scan_iter(match=f"*{run}*", count=1000)]
        if left:
            await state.delete(*left)
    finally:
        await state.aclose()


async def _committed_all(settings: Settings, group: str, topics: list[str]) -> None:
    async with harness.Lag(settings.kafka_bootstrap_servers) as lag:
        for _ in range(300):
            if await lag.of(group, topics) == 0:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{group} did not commit everything within 30 s")


async def test_mapper_ceiling_and_codec_floor_send_each_events_messages_to_the_same_partitions(
    bench_run: tuple[str, harness.Topics],
    run_roles_bg: Callable[[list[Any]], Awaitable[asyncio.Event]],
) -> None:
    run, topics = bench_run
    prefix = f"bench-{run}-m"
    settings = await topics.create(prefix)
    await produce_all(settings, encode_events(settings, World(run).events(EVENTS)))
    await run_roles_bg([MapperRole(settings)])
    await _committed_all(settings, settings.group_id("mapper"), settings.content_topics)

    # Each reads back what the mapper sent (below these offsets), not what the other sent.
    common = ["--prefix", prefix, "--warmup", 0, "--count", EVENTS]
    upto = ["--upto", json.dumps(await worker.output_ends(settings))]
    ceiling = await harness.run_worker("kafka-ceiling", "ceiling", *common, *upto)
    floor = await harness.run_worker("codec-floor", "codec-floor", *common, *upto)

    out = [settings.commands_topic(r) for r in settings.topology.regions] + [settings.audit_topic]
    by_partition: dict[tuple[str, int], list[tuple[Any, ...]]] = defaultdict(list)
    for r in await worker._read_back(settings, out):
        by_partition[(r.topic, r.partition)].append((r.key, r.value, tuple(r.headers)))
    # The mapper's messages come first on each partition, then the ceiling's, then the
    # codec floor's (which encoded its own): the same ones.
    for tp, messages in by_partition.items():
        third = len(messages) // 3
        mapper = Counter(messages[:third])
        assert Counter(messages[third : 2 * third]) == mapper, tp
        assert Counter(messages[2 * third :]) == mapper, tp
    for region in settings.topology.regions:
        used = {p for t, p in by_partition if t == settings.commands_topic(region)}
        assert len(used) > 1, f"every command for {region} on one partition"
    commands = sum(len(m) for (t, _), m in by_partition.items() if t != settings.audit_topic)
    assert ceiling["sent"]["commands"] == floor["sent"]["commands"] == commands // 3


async def test_redis_ceiling_deletes_the_keys_and_tagged_keys_the_sink_deletes(
    bench_run: tuple[str, harness.Topics],
) -> None:
    run, topics = bench_run
    region = "eu-west"
    prefix = f"bench-{run}-s"
    settings = await topics.create(prefix)
    world = World(run)
    commands = await harness._purge_commands(settings, world, region, EVENTS)
    codec = codec_for(settings)
    topic = settings.commands_topic(region)
    await produce_all(
        settings,
        [(topic, c.entity.encode(), codec.encode(c.schema_type, c.to_record())) for c in commands],
    )
    # Plus a page per purged tag that no command names: only its tag's index reaches it.
    tags = sorted({t for c in commands for t in c.tags})
    entries = world.cache_entries() + [(f"page:{run}:{t}", [t]) for t in tags]
    members: dict[str, list[str]] = defaultdict(list)
    for key, tags in entries:
        for tag in tags:
            members[tag].append(key)
    named = {
        k
        for c in commands
        for k in (
            *c.keys,
            *(keys.tag_index(t) for t in c.tags),
            *(m for t in c.tags for m in members[t]),
        )
    }
    cached = {k for k, _ in entries} | {keys.tag_index(t) for _, tags in entries for t in tags}
    redis = Redis.from_url(settings.region_redis_urls[region])
    try:
        await harness._fill_cache(redis, entries)
        assert await _present(redis, named & cached) == len(named & cached) > 0
        assert cached - named, "every cached key is named: nothing to leave alone"

        await harness.run_worker(
            "redis-ceiling",
            "redis-ceiling",
            "--prefix",
            prefix,
            "--region",
            region,
            "--warmup",
            0,
            "--count",
            len(commands),
        )

        assert await _present(redis, named) == 0
        assert await _present(redis, cached - named) == len(cached - named)
    finally:
        await redis.delete(*cached, *(keys.written_at(k) for k, _ in entries))
        await redis.aclose()


async def _present(redis: Redis, names: set[str]) -> int:
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.exists(name)
    return sum(await pipe.execute())
