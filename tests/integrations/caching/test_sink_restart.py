"""A sink that dies after applying but before committing re-applies on restart and loses nothing."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from cachesync.consumers.commands import Command, PurgeCommand, command_id
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.pipeline.kafka import make_producer
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.schemas import SingleObjectCodec
from cachesync.topology.admin import apply_topics
from tests.helpers import eventually

REGION = "eu-west"


class DiesAfterApply(RedisSink):
    """Applies its first batch, then hangs as a killed process would, before the commit."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.applied_ids: list[str] = []
        self.hung = asyncio.Event()

    def add(self, command: Command) -> None:
        self.applied_ids.append(command.command_id)
        super().add(command)

    async def flush(self) -> FlushResult:
        await super().flush()
        self.hung.set()
        await asyncio.Event().wait()  # never returns: the offsets are never committed
        raise AssertionError("unreachable")


class Counting(RedisSink):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    def add(self, command: Command) -> None:
        self.seen.append(command.command_id)
        super().add(command)


async def _committed(settings: Settings, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(
        meta.offset
        for tp, meta in offsets.items()
        if isinstance(tp, TopicPartition) and tp.topic == topic
    )


async def test_killed_sink_reapplies_uncommitted_commands(
    settings: Settings, topics: list[str], region_redis: dict[str, Redis]
) -> None:
    """Killed between apply and commit: the restarted sink re-reads every command, applies the
    rest, and skips those already applied (their marker is written with the effect)."""
    redis = region_redis[REGION]
    run = uuid.uuid4().hex[:8]
    cache_keys = [f"restart:{run}:{i}" for i in range(50)]
    for key in cache_keys:
        await cache_put(redis, key, b"stale")
    # Topics and groups of its own: the sink must see exactly these commands, in order.
    test_settings = settings.model_copy(
        update={
            "group_prefix": f"{settings.group_prefix}-restart-{run}",
            "topic_prefix": f"{settings.topic_prefix}restart-{run}.",
        }
    )
    await apply_topics(
        test_settings.kafka_bootstrap_servers, test_settings.topology, test_settings.topic_prefix
    )
    codec = SingleObjectCodec(settings.catalog)
    topic = test_settings.commands_topic(REGION)
    producer = make_producer(settings.kafka_bootstrap_servers, client_id="test")
    await producer.start()
    ids = []
    try:
        for i, key in enumerate(cache_keys):
            cmd = PurgeCommand(
                command_id=command_id(f"evt-{run}-{i}", REGION, "purge"),
                origin_event_id=f"evt-{run}-{i}",
                origin_event_type="photo.updated",
                origin_occurred_at=0,
                region=REGION,
                entity=f"e:{i}",
                version=1,
                issued_at=0,
                scope="photo",
                keys=(key,),
            )
            ids.append(cmd.command_id)
            await producer.send(
                topic, codec.encode("purge", cmd.to_record()), key=cmd.entity.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()

    url = settings.region_redis_urls[REGION]
    dying = SinkRole(test_settings, DiesAfterApply(REGION, url))
    await dying.start()
    stop = asyncio.Event()
    task = asyncio.create_task(dying.loop.run(stop))
    await asyncio.wait_for(dying.sink.hung.wait(), timeout=30)  # type: ignore[attr-defined]
    first_batch = list(dying.sink.applied_ids)  # type: ignore[attr-defined]
    assert first_batch, "the dying sink applied nothing"
    task.cancel()  # the kill: no drain, no commit
    await asyncio.gather(task, return_exceptions=True)
    await dying.consumer.stop()
    await dying.producer.stop()
    group = test_settings.group_id("sink", REGION, "redis")
    assert await _committed(test_settings, group, topic) == 0, (
        "offsets were committed before the effect returned"
    )

    # The platform re-caches one key after its real purge: that copy is fresh, and a
    # redelivered command must not delete it again (applied at most once in effect).
    refilled = cache_keys[ids.index(first_batch[0])]
    await cache_put(redis, refilled, b"fresh-after-the-purge")
    restarted = SinkRole(test_settings, Counting(REGION, url))
    await restarted.start()
    stop = asyncio.Event()
    task = asyncio.create_task(restarted.loop.run(stop))
    others = [k for k in cache_keys if k != refilled]
    try:

        async def all_reread() -> bool:
            return set(ids) <= set(restarted.sink.seen) and restarted.loop.records_committed >= len(
                ids
            )  # type: ignore[attr-defined]

        await eventually(all_reread, what="the restarted sink did not re-read every command")
        assert await _none_left(redis, others), "keys left after restart"
        seen = set(restarted.sink.seen)  # type: ignore[attr-defined]
        assert set(first_batch) <= seen, "commands applied before the kill were not re-read"
        assert set(ids) <= seen
        assert await redis.get(refilled) == b"fresh-after-the-purge", (
            "a duplicate was applied twice"
        )
        assert restarted.stats.applied == len(ids) - len(set(first_batch))
    finally:
        stop.set()
        await task
        await restarted.stop()
    assert await _committed(test_settings, group, topic) >= len(ids)


async def _none_left(redis: Redis, keys: list[str]) -> bool:
    return await redis.exists(*keys) == 0
