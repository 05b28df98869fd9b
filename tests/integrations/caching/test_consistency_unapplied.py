"""The checker expects what the mapper issued: purges no sink applied are named stale, and a
sink that never reports is a 0 % row, not a missing one."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis
from rich.console import Console

from cachesync.consumers import keys
from cachesync.consumers.cli.consistency import consistency_table, stale_table
from cachesync.consumers.ops.consistency import ConsistencyChecker
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.kafka import partitions_of
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole, run_roles
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.topology.admin import apply_topics
from tests.helpers import eventually

SKIPPED = "eu-west"
RunRoles = Callable[[list[Any]], Awaitable[asyncio.Event]]


@pytest.fixture
async def own(settings: Settings) -> Settings:
    """Topics and groups of this test's own: the checker reads every purge on them."""
    run = uuid.uuid4().hex[:8]
    own = settings.model_copy(
        update={
            "group_prefix": f"{settings.group_prefix}-consistency-{run}",
            "topic_prefix": f"{settings.topic_prefix}consistency-{run}.",
        }
    )
    await apply_topics(own.kafka_bootstrap_servers, own.topology, own.topic_prefix)
    return own


def _upload(wedding: str) -> dict[str, Any]:
    return new_event(
        "photo.uploaded",
        wedding_id=wedding,
        photo_id=f"p-{wedding}",
        album_id=None,
        path=f"/weddings/{wedding}/photos/p.jpg",
        content_type="image/jpeg",
        size_bytes=1,
    )


async def _cache_old_copies(redis: Redis, weddings: list[str]) -> None:
    """What each upload's purge must drop: a named key and a key under its tag, cached
    ten seconds before the upload."""
    before = int(time.time() * 1000) - 10_000
    for w in weddings:
        await cache_put(redis, f"wedding:{w}:gallery", b"old", written_at_ms=before)
        await cache_put(
            redis, f"photo:old-{w}", b"old", tags=[f"wedding:{w}:photos"], written_at_ms=before
        )


async def _stale_in_redis(redis: Redis, weddings: list[str], since_ms: int) -> set[str]:
    """The oracle: the weddings whose old gallery copy is still in this Redis."""
    stale = set()
    for w in weddings:
        stamp = await redis.get(keys.written_at(f"wedding:{w}:gallery"))
        if await redis.exists(f"wedding:{w}:gallery") and stamp and int(stamp) < since_ms:
            stale.add(w)
    return stale


async def _publish(settings: Settings, events: list[dict[str, Any]]) -> None:
    pub = EventPublisher(settings)
    await pub.start()
    try:
        for event in events:
            await pub.publish("photo.uploaded", event)
        await pub.flush()
    finally:
        await pub.stop()


@pytest.fixture
async def checker_of() -> AsyncIterator[Callable[..., Awaitable[ConsistencyChecker]]]:
    """Start a checker (in the background, reading from now); stopped at teardown."""
    running: list[tuple[ConsistencyChecker, asyncio.Event, asyncio.Task[None]]] = []

    async def start(settings: Settings, events: list[dict[str, Any]]) -> ConsistencyChecker:
        checker = ConsistencyChecker(
            settings,
            window_s=1.0,
            recheck_s=0.3,
            give_up_s=2.0,
            edge_urls={},
            event_ids={e["event_id"] for e in events},
            sinks={r: ("redis",) for r in settings.topology.regions},
        )
        stop = asyncio.Event()
        task = asyncio.create_task(checker.run(stop))
        running.append((checker, stop, task))
        await asyncio.wait_for(checker.ready.wait(), 10)
        return checker

    yield start
    for checker, stop, task in running:
        stop.set()
        await task
        await checker.close()


async def _all_judged(checker: ConsistencyChecker, n: int, regions: list[str]) -> None:
    async def done() -> bool:
        rows = [checker.tallies.get((r, "redis")) for r in regions]
        return all(t is not None and t.probed == n for t in rows) and checker.pending == 0

    await eventually(done, within=60, what=f"{n} purges judged in every region")


def _row(text: str, region: str, sink: str) -> list[str]:
    """The cells of the (region, sink) row of a rendered consistency table."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells[:2] == [region, sink]:
            return cells
    raise AssertionError(f"no row for {region}/{sink} in:\n{text}")


def _render(*tables: Any) -> str:
    out = Console(record=True, width=320, file=open(os.devnull, "w"))  # noqa: SIM115
    for table in tables:
        out.print(table)
    return out.export_text()


async def test_commands_skipped_by_moving_a_group_offset_are_named_stale(
    own: Settings,
    region_redis: dict[str, Redis],
    run_roles_bg: RunRoles,
    checker_of: Callable[..., Awaitable[ConsistencyChecker]],
) -> None:
    """Stop eu-west's Redis sink, commit its group past 100 purges, restart it: the checker
    names those 100 (with their keys) as stale in eu-west, exactly the copies its Redis
    still holds, and the other regions converged."""
    run = uuid.uuid4().hex[:6]
    before, skipped, after = (
        [f"w-{run}-{part}{i}" for i in range(n)] for part, n in (("a", 5), ("s", 100), ("b", 5))
    )
    weddings = before + skipped + after
    events = {w: _upload(w) for w in weddings}
    started_ms = int(time.time() * 1000)
    for redis in region_redis.values():
        await _cache_old_copies(redis, weddings)
    checker = await checker_of(own, list(events.values()))
    url = own.region_redis_urls[SKIPPED]
    await run_roles_bg(
        [MapperRole(own)]
        + [SinkRole(own, RedisSink(r, u)) for r, u in own.region_redis_urls.items() if r != SKIPPED]
    )
    sink_stop = asyncio.Event()
    sink = SinkRole(own, RedisSink(SKIPPED, url))
    sink_task = asyncio.create_task(run_roles([sink], sink_stop))
    await _publish(own, [events[w] for w in before])

    async def before_applied() -> bool:
        return not await _stale_in_redis(region_redis[SKIPPED], before, started_ms)

    await eventually(before_applied, what="eu-west applied the first purges")
    sink_stop.set()
    await asyncio.wait_for(sink_task, 30)

    group = own.group_id("sink", SKIPPED, "redis")
    topic = own.commands_topic(SKIPPED)
    await _publish(own, [events[w] for w in skipped])
    committed = sum((await _committed(own, group, topic)).values())

    async def issued() -> bool:
        return sum((await _ends(own, topic)).values()) - committed == len(skipped)

    await eventually(issued, what="the mapper issued the 100 purges for eu-west")
    moved = await _commit_ends(own, group, topic)
    assert sum(moved.values()) - committed == 100, "the group was not moved past 100 commands"
    await run_roles_bg([SinkRole(own, RedisSink(SKIPPED, url))])
    await _publish(own, [events[w] for w in after])
    await _all_judged(checker, len(weddings), list(own.topology.regions))

    # The oracle, each region's Redis: eu-west still holds the skipped purges' old copies.
    stale_in_eu = await _stale_in_redis(region_redis[SKIPPED], weddings, started_ms)
    assert stale_in_eu == set(skipped)
    for region, redis in region_redis.items():
        if region != SKIPPED:
            assert not await _stale_in_redis(redis, weddings, started_ms), region

    eu = checker.tallies[(SKIPPED, "redis")]
    assert (eu.probed, eu.converged, eu.stale_count, eu.gave_up, eu.unapplied) == (
        110,
        10,
        100,
        100,
        100,
    )
    by_event = {e["event_id"]: w for w, e in events.items()}
    named = {by_event[s.event_id]: s for s in eu.stale.values()}
    assert set(named) == stale_in_eu
    for w, entry in named.items():
        assert {f"wedding:{w}:gallery", f"photo:old-{w}"} <= set(entry.keys), entry
        assert entry.reason.startswith("never applied"), entry
    for region in own.topology.regions:
        if region != SKIPPED:
            tally = checker.tallies[(region, "redis")]
            assert (tally.probed, tally.converged, tally.stale_count) == (110, 110, 0), region
            assert tally.share == 1.0

    listing = _render(stale_table(checker, limit=100))
    assert all(f"wedding:{w}:gallery" in listing for w in skipped)
    print(_render(consistency_table(checker), stale_table(checker, limit=5)))

    # The operator's view: the command, run afterwards over the same purges.
    result = await _cli(own, "--since", "5m", "--duration", "1", "--window", "1", "--give-up", "1")
    print(result)
    assert _row(result, SKIPPED, "redis")[2:4] == ["110", "9.0909%"], result
    assert "... and 80 more" in result, result
    for region in own.topology.regions:
        if region != SKIPPED:
            assert _row(result, region, "redis")[2:4] == ["110", "100.0000%"], result


async def test_a_sink_that_never_reports_shows_a_zero_row(
    own: Settings,
    region_redis: dict[str, Redis],
    run_roles_bg: RunRoles,
    checker_of: Callable[..., Awaitable[ConsistencyChecker]],
) -> None:
    """No Redis sink runs in ap-southeast and nothing is cached there, so no read-back finds a
    stale copy: its row is still there, at 0 %, each purge named as never applied."""
    silent = "ap-southeast"
    run = uuid.uuid4().hex[:6]
    weddings = [f"w-{run}-{i}" for i in range(5)]
    events = {w: _upload(w) for w in weddings}
    started_ms = int(time.time() * 1000)
    for region, redis in region_redis.items():
        if region != silent:
            await _cache_old_copies(redis, weddings)
    checker = await checker_of(own, list(events.values()))
    await run_roles_bg(
        [MapperRole(own)]
        + [SinkRole(own, RedisSink(r, u)) for r, u in own.region_redis_urls.items() if r != silent]
    )
    await _publish(own, list(events.values()))

    async def applied() -> bool:
        stale = [await _stale_in_redis(r, weddings, started_ms) for r in region_redis.values()]
        return not any(stale)

    await eventually(applied, what="the running sinks applied every purge")
    await _all_judged(checker, len(weddings), list(own.topology.regions))

    for region, redis in region_redis.items():
        assert not await _stale_in_redis(redis, weddings, started_ms), region
    quiet = checker.tallies[(silent, "redis")]
    assert (quiet.probed, quiet.converged, quiet.unapplied, quiet.stale_count) == (5, 0, 5, 5)
    assert quiet.share == 0.0
    by_event = {e["event_id"]: w for w, e in events.items()}
    for entry in quiet.stale.values():
        assert entry.reason == "never applied (no report from the sink)", entry
        assert f"wedding:{by_event[entry.event_id]}:gallery" in entry.keys
    for region in own.topology.regions:
        if region != silent:
            assert checker.tallies[(region, "redis")].converged == 5, region
    table = _render(consistency_table(checker))
    assert _row(table, silent, "redis")[2:4] == ["5", "0.0000%"], table


async def _committed(settings: Settings, group: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = await partitions_of(settings.kafka_bootstrap_servers, [topic])
        return {tp: (await consumer.committed(tp)) or 0 for tp in partitions}
    finally:
        await consumer.stop()


async def _ends(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        partitions = await partitions_of(settings.kafka_bootstrap_servers, [topic])
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()


async def _commit_ends(settings: Settings, group: str, topic: str) -> dict[TopicPartition, int]:
    """Move `group`'s committed offsets on `topic` to its ends, as an operator's reset
    would (the group has no member: its sink is stopped)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = await partitions_of(settings.kafka_bootstrap_servers, [topic])
        consumer.assign(partitions)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        await consumer.commit(ends)
    finally:
        await consumer.stop()
    return await _committed(settings, group, topic)


async def _cli(settings: Settings, *args: str) -> str:
    """`cachesync consistency` as an operator runs it, on this test's topics, Redis only."""
    env = {
        **os.environ,
        "CACHESYNC_TOPIC_PREFIX": settings.topic_prefix,
        "COLUMNS": "200",
        "TERM": "dumb",
    }
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("cachesync")),
        "consistency",
        "--sink",
        "redis",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()
