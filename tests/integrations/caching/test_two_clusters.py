"""Two Kafka clusters joined by MirrorMaker 2, as deploy/PRODUCTION.md runs them.

The home cluster is the stack's broker; eu-west has a KRaft broker of its own, and
MirrorMaker 2 (deploy/mm2/mm2.properties, IdentityReplicationPolicy) carries
`cache.commands.eu-west` out to it and `cache.audit` back: all from the stack's
"two-clusters" extra (deploy/local/up.d/two-clusters.sh). The mapper runs at home; eu-west's
Redis sink reads eu-west's cluster (KAFKA_BOOTSTRAP_SERVERS_EU_WEST). Whether a purge
happened is asked of eu-west's Redis itself; the order per entity, of eu-west's own copy
of the command topic and of what the sink applied.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from redis.asyncio import Redis
from rich.console import Console

from cachesync.consumers.commands import COMMAND_TYPES, Command
from cachesync.consumers.ops.platform_cache import cache_put, cache_put_many
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.ops.replication import copy_lag, replication_lag, replication_table
from cachesync.consumers.ops.trace import expected_sinks, read_trace, render
from cachesync.consumers.pipeline.assemble import prepare_clusters
from cachesync.consumers.pipeline.codecs import codec_for, decode
from cachesync.consumers.pipeline.kafka import (
    KafkaConnection,
    make_admin,
    make_consumer,
    make_producer,
    partitions_of,
)
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings, load_settings
from cachesync.consumers.sinks.redis import RedisSink
from tests.helpers import eventually
from tests.integrations.caching.stack_extras import read_env, stack_dir, start_extra

RATE = 100  # events/s, for the latency figure and the outage stream
STEADY_S = 6.0  # streaming before eu-west's cluster stops: the latency samples
OUTAGE_S = 30.0  # eu-west's cluster stopped, the stream going on


@dataclass
class TwoClusters:
    settings: Settings  # home: KAFKA_BOOTSTRAP_SERVERS; eu-west: its own cluster
    eu_west: str  # eu-west's brokers
    eu_west_pid: Path  # the eu-west broker's PID file, to stop it


@pytest.fixture(scope="module")
def two_clusters(settings: Settings) -> Iterator[TwoClusters]:
    """Settings of a topic prefix of this module's, with eu-west on its own cluster."""
    start_extra("two-clusters")
    eu_west = read_env(stack_dir() / "two-clusters.env")["KAFKA_BOOTSTRAP_SERVERS_EU_WEST"]
    run = uuid.uuid4().hex[:8]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KAFKA_BOOTSTRAP_SERVERS_EU_WEST", eu_west)
        own = load_settings(topic_prefix=f"mm2-{run}.", group_prefix=f"mm2-{run}")
        yield TwoClusters(own, eu_west, stack_dir() / "run/kafka-eu-west.pid")


@pytest.fixture(scope="module")
async def mirrored(two_clusters: TwoClusters) -> TwoClusters:
    """The topics, at home and on eu-west's cluster (its command, audit and dead-letter topics)."""
    await prepare_clusters(two_clusters.settings)
    return two_clusters


class AppliedOrder(RedisSink):
    """Remembers, per entity, the versions of the commands handed to it (a command handed
    twice, a mirror's duplicate, counts at its first hand-over)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.seen: set[str] = set()
        self.versions: dict[str, list[int]] = {}

    def add(self, command: Command) -> None:
        if command.command_id not in self.seen:
            self.seen.add(command.command_id)
            self.versions.setdefault(command.entity, []).append(command.version)
        super().add(command)


def photo_updated(wedding: str, photo: str, occurred_at: int | None = None) -> dict[str, object]:
    return new_event(
        "photo.updated",
        wedding_id=wedding,
        photo_id=photo,
        path=f"/weddings/{wedding}/photos/{photo}.jpg",
        changed_fields=["caption"],
        occurred_at=occurred_at,
    )


async def test_event_at_home_purges_eu_west_through_mirrormaker(
    mirrored: TwoClusters, region_redis: dict[str, Redis], run_roles_bg
) -> None:
    """An event published at home purges eu-west's Redis through MirrorMaker 2: the sink
    read eu-west's cluster only, and `trace` at home shows the path to eu-west's Redis."""
    s = mirrored.settings
    sink = SinkRole(s, RedisSink("eu-west", s.region_redis_urls["eu-west"]))
    assert sink.kafka.bootstrap_servers == mirrored.eu_west != s.kafka_bootstrap_servers
    wedding, photo = f"w-{uuid.uuid4().hex[:8]}", f"ph-{uuid.uuid4().hex[:8]}"
    eu = region_redis["eu-west"]
    await cache_put(eu, f"photo:{photo}", b"stale")
    await run_roles_bg([MapperRole(s), sink])
    event = photo_updated(wedding, photo)
    publisher = EventPublisher(s)
    await publisher.start()
    try:
        await publisher.publish("photo.updated", event)
    finally:
        await publisher.stop()

    async def purged() -> bool:
        return await eu.exists(f"photo:{photo}") == 0

    # Includes MirrorMaker 2 finding this module's new topics (refresh: 5 s locally).
    await eventually(purged, within=60, what="eu-west's Redis purged through MirrorMaker 2")

    # The sink's group lives on eu-west's cluster and not at home: it read the mirror.
    group = s.group_id("sink", "eu-west", "redis")
    assert await _group_exists(KafkaConnection(mirrored.eu_west), group)
    assert not await _group_exists(KafkaConnection.of(s), group)

    # Its audit record went to eu-west's cache.audit; `trace` reads home's, where the mirror
    # brought it.
    event_id = str(event["event_id"])

    async def traced() -> bool:
        view = await read_trace(s, event_id)
        return any(c.region == "eu-west" and "redis" in c.sinks for c in view.commands.values())

    await eventually(traced, within=30, what="eu-west's audit record mirrored home")
    view = await read_trace(s, event_id)
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render(view, expected_sinks(s)))
    text = console.export_text()
    # Only eu-west's Redis sink runs here: the one "redis applied" line is its own.
    assert "mapper" in text and "eu-west" in text, text
    assert any("redis" in line and "applied" in line for line in text.splitlines()), text


async def _group_exists(kafka: KafkaConnection, group: str) -> bool:
    admin = make_admin(kafka, client_id="test-two-clusters")
    await admin.start()
    try:
        return group in {g[0] for g in await admin.list_consumer_groups()}
    finally:
        await admin.close()


@dataclass
class Purges:
    """When each key disappeared from a Redis, polled: the oracle is the cache itself."""

    redis: Redis
    published: dict[str, float] = field(default_factory=dict)  # key -> published at
    gone: dict[str, float] = field(default_factory=dict)  # key -> first seen gone

    def latencies_ms(self, keys: list[str]) -> list[float]:
        return sorted((self.gone[k] - self.published[k]) * 1000 for k in keys)

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            pending = [k for k in self.published if k not in self.gone]
            if pending:
                pipe = self.redis.pipeline(transaction=False)
                for key in pending:
                    pipe.exists(key)
                now = time.monotonic()
                for key, present in zip(pending, await pipe.execute(), strict=True):
                    if not present:
                        self.gone[key] = now
            # Fine-grained while few are pending (the latency figure), coarser in a backlog.
            await asyncio.sleep(0.005 if len(pending) < 300 else 0.1)


# About 60 s on an idle machine (30 of them the outage); the broker's restart and the
# catch-up take longer on a loaded one.
@pytest.mark.timeout(300)
async def test_eu_west_cluster_down_for_30s_loses_nothing_and_keeps_order(
    mirrored: TwoClusters, region_redis: dict[str, Redis], run_roles_bg
) -> None:
    """A stream at 100 events/s; eu-west's cluster stopped 30 s in the middle of it. Every
    purge reaches eu-west's Redis after it returns, each entity's commands arrive and are
    applied in the order issued, and the replication lag, unreadable during the outage,
    reads 0 once caught up (as `status` shows it).

    Prints the figures: home event -> Redis purged, p50/p99 at 100 events/s in the steady
    state, for eu-west (through MirrorMaker 2) and for us-east (read at home, the same
    pipeline without the mirror), and the catch-up time after eu-west's cluster answers."""
    s = mirrored.settings
    eu, us = region_redis["eu-west"], region_redis["us-east"]
    recorder = AppliedOrder("eu-west", s.region_redis_urls["eu-west"])
    home_sink = RedisSink("us-east", s.region_redis_urls["us-east"])
    await run_roles_bg([MapperRole(s), SinkRole(s, recorder), SinkRole(s, home_sink)])
    run = uuid.uuid4().hex[:6]
    weddings = [f"w-{run}-{i}" for i in range(20)]
    mirrored_purges, home_purges = Purges(eu), Purges(us)
    stop_watch = asyncio.Event()
    watchers = [asyncio.create_task(p.watch(stop_watch)) for p in (mirrored_purges, home_purges)]
    publisher = EventPublisher(s)
    await publisher.start()
    issued: dict[str, list[int]] = {f"wedding:{w}": [] for w in weddings}
    t0_ms = int(time.time() * 1000)
    sent = 0
    baseline = True  # us-east's keys are watched in the steady state only

    staged = 0  # the stream's events whose stale entries are already written

    async def stage(upto: int) -> None:
        """The stale entries of the stream's next events, in one round trip per Redis: the
        stream shares the event loop with the roles under test, so it awaits once per
        event (its publish) rather than three times, and keeps to its rate."""
        nonlocal staged
        entries = [(f"photo:ph-{run}-{i}", b"stale", []) for i in range(staged, upto)]
        await cache_put_many(eu, entries)
        if baseline:
            await cache_put_many(us, entries)
        staged = upto

    async def publish_one(i: int, wedding: str | None = None) -> None:
        wedding, key = wedding or weddings[i % len(weddings)], f"photo:ph-{run}-{i}"
        if i < 0:  # the warm-up's
            await cache_put(eu, key, b"stale")
            await cache_put(us, key, b"stale")
        elif i >= staged:
            await stage(i + 50)
        if baseline:
            home_purges.published[key] = time.monotonic()
        mirrored_purges.published[key] = time.monotonic()
        issued.setdefault(f"wedding:{wedding}", []).append(t0_ms + i)
        event = photo_updated(wedding, key.removeprefix("photo:"), t0_ms + i)
        await publisher.publish("photo.updated", event, wait=False)

    async def stream(stop: asyncio.Event) -> None:
        nonlocal sent
        start = time.monotonic()
        while not stop.is_set():
            await publish_one(sent)
            sent += 1
            await asyncio.sleep(max(0.0, start + sent / RATE - time.monotonic()))

    try:
        # Warm-up, on an entity of its own: the path works end to end before anything is
        # measured.
        await publish_one(-1, wedding=f"w-{run}-warm-up")
        await eventually(
            lambda: _all_gone(mirrored_purges), within=60, what="warm-up purged in eu-west"
        )
        for purges in (mirrored_purges, home_purges):
            purges.published.clear()
            purges.gone.clear()
        issued.pop(f"wedding:w-{run}-warm-up")

        stop_stream = asyncio.Event()
        streamer = asyncio.create_task(stream(stop_stream))
        await asyncio.sleep(STEADY_S)
        # The latency samples: events of the steady state, all purged before the outage.
        baseline = False
        steady = list(home_purges.published)
        await eventually(
            lambda: _gone(mirrored_purges, steady), within=20, what="steady-state purges"
        )
        _stop_broker(mirrored.eu_west_pid)
        await asyncio.sleep(2)
        during = await replication_lag(s, timeout_s=3)
        assert [(r.region, r.records) for r in during] == [("eu-west", None)], during
        await asyncio.sleep(OUTAGE_S - 2)
        await asyncio.to_thread(start_extra, "two-clusters")  # the broker answers again
        back = time.monotonic()
        stop_stream.set()
        await streamer
        await publisher.flush()
        lags: list[int] = []

        async def caught_up() -> bool:
            lag = await replication_lag(s, timeout_s=3)
            if lag and lag[0].records is not None:
                lags.append(lag[0].records)
            return await _all_gone(mirrored_purges)

        await eventually(caught_up, within=90, what="every purge reached eu-west after it returned")
        done = max(mirrored_purges.gone.values())
    finally:
        stop_watch.set()
        await asyncio.gather(*watchers)
        await publisher.stop()

    # Nothing lost: every key of every event is gone from eu-west's Redis (checked above),
    # and the order per entity held on eu-west's copy of the topic and in what was applied.
    mirrored_order = await _versions_on(s, KafkaConnection(mirrored.eu_west), set(issued))
    for entity, versions in issued.items():
        assert mirrored_order.get(entity) == versions, f"{entity}: eu-west's copy out of order"
        assert recorder.versions.get(entity) == versions, f"{entity}: applied out of order"

    async def lag_zero() -> bool:
        lag = await replication_lag(s)
        return bool(lag) and lag[0].records == 0

    await eventually(lag_zero, within=20, what="replication lag back to 0")
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(replication_table(await replication_lag(s)))
    assert s.commands_topic("eu-west") in console.export_text()
    assert len(steady) >= STEADY_S * RATE * 0.8
    eu_ms, us_ms = mirrored_purges.latencies_ms(steady), home_purges.latencies_ms(steady)
    print(
        f"\nhome event -> Redis purged at {RATE} events/s ({len(steady)} events): eu-west "
        f"through MirrorMaker 2 p50 {_q(eu_ms, 0.5):.0f} ms, p99 {_q(eu_ms, 0.99):.0f} ms; "
        f"us-east at home p50 {_q(us_ms, 0.5):.0f} ms, p99 {_q(us_ms, 0.99):.0f} ms. "
        f"eu-west's cluster down {OUTAGE_S:.0f} s under {sent} events: caught up "
        f"{done - back:.1f} s after it answered (largest lag read then: "
        f"{max(lags, default=0)} records)"
    )


def _q(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


async def _all_gone(purges: Purges) -> bool:
    return len(purges.gone) == len(purges.published)


async def _gone(purges: Purges, keys: list[str]) -> bool:
    return all(k in purges.gone for k in keys)


def _stop_broker(pid_file: Path) -> None:
    """SIGKILL, as a crash: the stack's script starts it again from its PID file's absence."""
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"eu-west's broker (pid {pid}) did not stop")


async def _versions_on(
    s: Settings, kafka: KafkaConnection, entities: set[str]
) -> dict[str, list[int]]:
    """Per entity, the versions of its purges on that cluster's eu-west command topic, in
    offset order, each command once (a mirror's duplicate is a re-delivery)."""
    topic = s.commands_topic("eu-west")
    codec = codec_for(s)
    consumer = make_consumer(kafka, group_id=None, client_id="test-order")
    await consumer.start()
    try:
        partitions = await partitions_of(kafka, [topic])
        ends = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen: set[str] = set()
        out: dict[str, list[int]] = {}
        reached: dict[TopicPartition, int] = {}
        while any(reached.get(tp, 0) < ends[tp] for tp in partitions):
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                reached[tp] = records[-1].offset + 1 if records else reached.get(tp, 0)
                for record in records:
                    decoded = await decode(codec, record.value or b"")
                    command = COMMAND_TYPES[decoded.type_name].from_record(decoded.record)
                    if command.entity in entities and command.command_id not in seen:
                        seen.add(command.command_id)
                        out.setdefault(command.entity, []).append(command.version)
        return out
    finally:
        await consumer.stop()


async def test_replication_lag_counts_the_records_a_copy_lacks(
    mirrored: TwoClusters,
) -> None:
    """`copy_lag` on two topics of the home cluster that MirrorMaker 2 does not carry: ten
    records at the source, the first seven copied with their timestamps and partition."""
    s = mirrored.settings
    home = KafkaConnection.of(s)
    source, copy = s.topic("lag-probe.source"), s.topic("lag-probe.copy")
    admin = make_admin(home, client_id="test-lag")
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 2, 1) for t in (source, copy)])
    finally:
        await admin.close()
    assert await copy_lag(home, home, source, copy) == (0, 0.0)
    base = int(time.time() * 1000) - 60_000
    producer = make_producer(home, client_id="test-lag")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(source, b"r", partition=i % 2, timestamp_ms=base + i)
        for i in range(7):
            await producer.send_and_wait(copy, b"r", partition=i % 2, timestamp_ms=base + i)
    finally:
        await producer.stop()
    records, seconds = await copy_lag(home, home, source, copy)
    assert records == 3
    assert 59 < seconds < 120  # the oldest not copied (base + 7) was stamped a minute ago
    # A copy that does not exist yet lacks every record.
    assert (await copy_lag(home, home, source, s.topic("lag-probe.missing")))[0] == 10
