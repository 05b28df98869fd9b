"""A sink role pays per batch: spans only for sampled traces, audit records per flush.

Commands are produced straight to a test-owned command topic with the W3C context the
mapper would have put on them: one in a sampled trace, the others in unsampled ones. The
oracles are the spans the SDK exported, the audit topic read back, and Redis itself.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.trace import read_trace
from cachesync.consumers.pipeline.kafka import make_producer, partitions_of
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.schemas import SingleObjectCodec
from tests.integrations.caching.crashes import audit_records, own_topics, run_until_committed

EU = "eu-west"


def purge(run: str, n: int) -> PurgeCommand:
    now = int(time.time() * 1000)
    return PurgeCommand(
        command_id=f"cmd-{run}-{n}",
        origin_event_id=f"ev-{run}-{n}",
        origin_event_type="photo.updated",
        origin_occurred_at=now,
        region=EU,
        entity=f"wedding:{run}-{n}",
        version=now,
        issued_at=now,
        scope="wedding",
        keys=(f"wedding:{run}-{n}:gallery",),
    )


async def send_traced(settings: Settings, commands: list[tuple[PurgeCommand, str]]) -> None:
    """Produce each purge with the traceparent given, as the mapper's writer would."""
    codec = SingleObjectCodec(settings.catalog)
    producer = make_producer(settings.kafka_bootstrap_servers, client_id="test-sampling")
    await producer.start()
    try:
        for cmd, traceparent in commands:
            await producer.send(
                settings.commands_topic(cmd.region),
                codec.encode("purge", cmd.to_record()),
                key=cmd.entity.encode(),
                headers=[("traceparent", traceparent.encode())],
            )
        await producer.flush()
    finally:
        await producer.stop()


async def audit_messages(settings: Settings) -> int:
    """How many messages the audit topic holds."""
    parts = await partitions_of(settings.kafka_bootstrap_servers, [settings.audit_topic])
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(parts)
        starts = await consumer.beginning_offsets(parts)
    finally:
        await consumer.stop()
    return sum(ends[tp] - starts[tp] for tp in parts)


async def test_only_sampled_commands_get_spans_and_every_command_is_audited(
    settings: Settings, region_redis: dict[str, Redis], telemetry: Any
) -> None:
    """Of 24 purges, the one whose trace is sampled has its apply span (under the platform's
    span, linked by the flush span); the unsampled traces get no span at all. Every purge
    is applied, has an applied audit record carrying its trace id, in fewer audit messages
    than purges, and `trace` shows the redis outcome of an unsampled one."""
    own = await own_topics(settings, "sampling")
    since = int(time.time() * 1000) - 1000
    run = uuid.uuid4().hex[:8]
    commands = [purge(run, n) for n in range(24)]
    traces = {c.command_id: uuid.uuid4().hex for c in commands}
    parent_span = uuid.uuid4().hex[:16]
    sampled = commands[5]
    for c in commands:
        await cache_put(region_redis[EU], c.keys[0], b"stale")
    await send_traced(
        own,
        [
            (c, f"00-{traces[c.command_id]}-{parent_span}-{'01' if c is sampled else '00'}")
            for c in commands
        ],
    )

    await run_until_committed(SinkRole(own, RedisSink(EU, own.region_redis_urls[EU])), 24)

    assert await region_redis[EU].exists(*(c.keys[0] for c in commands)) == 0
    spans = telemetry.span_exporter.get_finished_spans()
    ours = {int(t, 16) for t in traces.values()}
    in_our_traces = [s for s in spans if s.context.trace_id in ours]
    applies = [s for s in in_our_traces if s.name == "cachesync.apply redis"]
    assert [s.attributes["cachesync.command_id"] for s in applies] == [sampled.command_id]
    apply = applies[0]
    assert format(apply.context.trace_id, "032x") == traces[sampled.command_id]
    assert format(apply.parent.span_id, "016x") == parent_span
    assert {s.context.trace_id for s in in_our_traces} == {apply.context.trace_id}
    flushes = [
        s
        for s in spans
        if s.name == "cachesync.flush redis"
        and any(link.context.span_id == apply.context.span_id for link in s.links)
    ]
    assert len(flushes) == 1 and flushes[0].parent.span_id == apply.context.span_id

    records = [r for r in await audit_records(own, since) if r.stage == "sink"]
    by_command = {r.command_id: r for r in records}
    assert len(records) == len(by_command) == 24
    for c in commands:
        record = by_command[c.command_id]
        assert (record.outcome, record.sink, record.event_id) == (
            "applied",
            "redis",
            c.origin_event_id,
        )
        assert record.trace_id == traces[c.command_id]
    assert await audit_messages(own) < len(commands)

    unsampled = commands[17]
    view = await read_trace(own, unsampled.origin_event_id, since_ms=since)
    assert view.commands[unsampled.command_id].sinks["redis"].outcome == "applied"
    assert view.trace_ids == {traces[unsampled.command_id]}
