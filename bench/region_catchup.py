"""A region that was down catches up: time to drain 10,000 events' commands, and the replay rate.

1. The mapper maps N demo events while eu-west's Redis sink is stopped, so eu-west's
   command topic holds the backlog (the other regions' sinks are not needed here).
2. eu-west's sink starts; the time until its committed offsets reach the topic's end
   is the catch-up time.
3. `replay` re-reads the same N events for eu-west only: events per second, commands
   produced included.

Run: python -m bench.region_catchup [--events 10000]. Prints figures; never asserts.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from bench.common import first_line, one_command_app
from cachesync.consumers.ops.demo import DemoWorld
from cachesync.consumers.ops.publish import EventPublisher
from cachesync.consumers.ops.replay import replay
from cachesync.consumers.pipeline.kafka import partitions_of
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole, run_roles
from cachesync.consumers.settings import Settings, load_settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.topology.admin import apply_topics

REGION = "eu-west"


async def _committed_lag(settings: Settings, group: str, topics: list[str]) -> int:
    tps = await partitions_of(settings.kafka_bootstrap_servers, topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        ends = await consumer.end_offsets(tps)
        return sum(ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


async def _until_drained(
    settings: Settings, group: str, topics: list[str], stop: asyncio.Event
) -> float:
    started = time.monotonic()
    while await _committed_lag(settings, group, topics) > 0:  # noqa: ASYNC110 (polls Kafka, not a flag)
        await asyncio.sleep(0.1)
    stop.set()
    return time.monotonic() - started


async def _publish_demo(settings: Settings, events: int) -> int:
    """The demo's opening events, then its mix, up to `events` in all; returns how many."""
    world = DemoWorld(weddings=500, vendors=800, seed=7)
    pub = EventPublisher(settings)
    await pub.start()
    t0 = time.monotonic()
    for event_type, record in world.opening_events():
        await pub.publish(event_type, record, wait=False)
    sent = len(world.opening_events())
    while sent < events:
        event_type, record = world.next_event()
        await pub.publish(event_type, record, wait=False)
        sent += 1
    await pub.flush()
    await pub.stop()
    print(f"produced {sent} events in {time.monotonic() - t0:.1f}s")
    return sent


async def _map_while_down(settings: Settings, sent: int) -> int:
    """The mapper fills every region's command topic while eu-west's sink is down;
    returns eu-west's backlog (commands)."""
    stop = asyncio.Event()
    mapper = MapperRole(settings)
    task = asyncio.create_task(run_roles([mapper], stop))
    mapped_in = await _until_drained(
        settings, settings.group_id("mapper"), settings.content_topics, stop
    )
    await task
    backlog = await _committed_lag(
        settings, settings.group_id("sink", REGION, "redis"), [settings.commands_topic(REGION)]
    )
    print(f"mapper: {sent} events in {mapped_in:.1f}s; eu-west backlog {backlog} commands")
    return backlog


async def _catch_up(settings: Settings, sent: int, backlog: int) -> None:
    """eu-west's sink comes back and works through its backlog."""
    stop = asyncio.Event()
    sink = SinkRole(settings, RedisSink(REGION, settings.region_redis_urls[REGION]))
    task = asyncio.create_task(run_roles([sink], stop))
    caught_up = await _until_drained(
        settings,
        settings.group_id("sink", REGION, "redis"),
        [settings.commands_topic(REGION)],
        stop,
    )
    await task
    print(
        f"catch-up: eu-west applied a backlog of {backlog} commands ({sent} events) in {caught_up:.1f}s "
        f"({backlog / caught_up:.0f} commands/s); applied {sink.stats.applied}"
    )


async def _replay(settings: Settings, since_ms: int) -> None:
    """Replay the same events for eu-west, then the same as a dry run."""
    report = await replay(settings, since_ms=since_ms, regions={REGION})
    print(
        f"replay: {report.records} events in {report.seconds:.1f}s = {report.events_per_second:.0f} events/s, "
        f"{sum(report.commands.values())} commands produced for {REGION}"
    )
    dry = await replay(settings, since_ms=since_ms, regions={REGION}, dry_run=True)
    print(
        f"replay --dry-run: {dry.records} events in {dry.seconds:.1f}s = {dry.events_per_second:.0f} events/s"
    )


async def run_catchup(events: int) -> None:
    run = uuid.uuid4().hex[:6]
    settings = load_settings(
        topic_prefix=f"bench-catchup-{run}.", group_prefix=f"bench-catchup-{run}"
    )
    await apply_topics(settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix)
    since = int(time.time() * 1000) - 1
    sent = await _publish_demo(settings, events)
    backlog = await _map_while_down(settings, sent)
    await _catch_up(settings, sent, backlog)
    await _replay(settings, since)


app = one_command_app()


@app.command(help=first_line(__doc__))
def main(events: int = 10_000) -> None:
    asyncio.run(run_catchup(events))


if __name__ == "__main__":
    app()
