"""The mapper under produce and dead-letter failures, on the real stack: a failed send is
retried with the index its first attempt saw, a dead-letter topic that is down holds its
batch without losing or committing anything, a record too large for the dead-letter
topic is kept truncated, and a command the broker refuses dead-letters its event while
the mapper goes on."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import COMMAND_TYPES, Command, PurgeCommand
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import Mapper
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.ops.trace import read_trace
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.audit import decode_audits
from cachesync.consumers.pipeline.dead_letters import KEPT_VALUE_BYTES
from cachesync.consumers.pipeline.kafka import Record
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.schemas import Codec
from cachesync.topology.admin import apply_topics, delete_topics
from tests.conftest import metric_points
from tests.helpers import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def own_topics(settings: Settings) -> AsyncIterator[Callable[[str], Any]]:
    """Settings with topics and groups of their own, for a test that breaks its topics."""
    made: list[Settings] = []

    async def make(name: str) -> Settings:
        tag = f"{name}-{uuid.uuid4().hex[:6]}"
        own = settings.model_copy(
            update={
                "topic_prefix": f"{settings.topic_prefix}{tag}.",
                "group_prefix": f"{settings.group_prefix}-{tag}",
            }
        )
        await apply_topics(own.kafka_bootstrap_servers, own.topology, own.topic_prefix)
        made.append(own)
        return own

    yield make
    for own in made:
        await delete_topics(own.kafka_bootstrap_servers, own.topic_prefix)


async def _admin(settings: Settings) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    return admin


async def _records(settings: Settings, topics: list[str], since_ms: int = 0) -> list[Record]:
    """Every record of `topics` from `since_ms` to their end as it is now."""
    async with TimeWindow(settings, topics, since_ms=since_ms) as window:
        return [r async for batch in window.batches() for r in batch]


async def _commands(
    settings: Settings, codec: Codec, event_ids: set[str], since_ms: int
) -> list[tuple[Command, int]]:
    """The commands on the region topics caused by `event_ids`, with each message's size."""
    topics = [settings.commands_topic(r) for r in settings.topology.regions]
    found: list[tuple[Command, int]] = []
    for record in await _records(settings, topics, since_ms):
        if headers.header(record, headers.EVENT_ID) not in {e.encode() for e in event_ids}:
            continue
        decoded = codec.decode(record.value or b"")
        command = COMMAND_TYPES[decoded.type_name].from_record(decoded.record)
        found.append((command, len(record.value or b"")))
    return found


def _without_issue_time(command: Command) -> Command:
    """What a retry must reproduce: everything but the time the command was issued."""
    return replace(command, issued_at=0)


class _FailOnce:
    """The mapper's producer loses its connection once, on the next batch of commands,
    before the broker acknowledged anything."""

    def __init__(self, role: MapperRole) -> None:
        self.real = role.producer.send_batch
        self.topics = {role.settings.commands_topic(r) for r in role.settings.topology.regions}
        self.armed = False
        self.failed = 0
        role.producer.send_batch = self  # type: ignore[method-assign]

    async def __call__(self, batch: Any, topic: str, *, partition: int) -> Any:
        if self.armed and topic in self.topics:
            self.armed = False
            self.failed += 1
            raise KafkaConnectionError("injected: connection to the broker lost")
        return await self.real(batch, topic, partition=partition)


async def test_a_failed_send_is_retried_with_the_index_its_first_attempt_saw(
    settings: Settings, topics: list[str], run_roles_bg: Any
) -> None:
    """A batch whose send fails after mapping yields, on retry, exactly the commands an
    unfailed mapping of it yields: the deleted vendor still reaches all its weddings."""
    run = uuid.uuid4().hex[:8]
    vendor = f"v-{run}"
    weddings = [f"w-{run}-{i:02d}" for i in range(20)]
    newcomer = f"w-{run}-new"
    since = int(time.time() * 1000)
    state = Redis.from_url(str(settings.state_redis_url))
    mapper = MapperRole(settings)
    failure = _FailOnce(mapper)
    await run_roles_bg([mapper])
    pub = EventPublisher(settings)
    await pub.start()
    try:
        # The vendor's weddings, mapped and committed in batches before the one that fails.
        for wedding in weddings:
            event = new_event("vendor.linked", vendor_id=vendor, wedding_id=wedding, role="band")
            await pub.publish("vendor.linked", event, wait=False)
        await pub.flush()

        async def linked() -> bool:
            members = await state.smembers(keys.vendor_weddings(vendor))
            return len(members) == len(weddings) and mapper.loop.records_committed >= len(weddings)

        await eventually(linked, what="the links in the relationship index")

        # One batch: a new link, an update that must see it, the deletion.
        batch = [
            (t, new_event(t, vendor_id=vendor, **fields))
            for t, fields in [
                ("vendor.linked", {"wedding_id": newcomer, "role": "dj"}),
                ("vendor.updated", {"category": "dj", "changed_fields": ["bio"]}),
                ("vendor.deleted", {}),
            ]
        ]
        # What an unfailed mapping of this batch yields, against the index as it stands.
        oracle = Mapper(settings.topology, RelationshipIndex(state, settings.topology))
        view = oracle.index.batch()
        await view.prefetch(*oracle.index_ids(batch))
        expected: dict[str, Command] = {}
        for event_type, record in batch:
            for command in await oracle.map_event(event_type, record, index=view):
                expected[command.command_id] = _without_issue_time(command)
        # The update sees the link queued just before it; the deletion reaches every wedding.
        for event_type, record in batch[1:]:
            purges = [c for c in expected.values() if c.origin_event_id == record["event_id"]]
            named = {k for c in purges if isinstance(c, PurgeCommand) for k in c.keys}
            assert {f"wedding:{w}:vendors" for w in [*weddings, newcomer]} <= named, event_type

        failure.armed = True
        for event_type, record in batch:
            await pub.publish(event_type, record, wait=False)
        await pub.flush()
    finally:
        await pub.stop()

    event_ids = {str(r["event_id"]) for _, r in batch}

    async def purges_sent() -> bool:
        found = await _commands(settings, mapper.codec, event_ids, since)
        purges = {(c.origin_event_id, c.region) for c, _ in found if c.kind == "purge"}
        return len(purges) == len(event_ids) * len(settings.topology.regions)

    try:
        await eventually(purges_sent, what="each event's purge in each region")
        await asyncio.sleep(1)  # the rest of the batch, had it been split in two
        assert failure.failed == 1, "the injected failure did not happen"
        found: dict[str, Command] = {}
        for command, _ in await _commands(settings, mapper.codec, event_ids, since):
            same = found.setdefault(command.command_id, _without_issue_time(command))
            assert same == _without_issue_time(command), "one id, two different commands"
        assert found == expected
        assert not await state.exists(keys.vendor_weddings(vendor)), "the deletion was not indexed"
    finally:
        stale = [keys.vendor_weddings(vendor)]
        stale += [keys.wedding_vendors(w) for w in [*weddings, newcomer]]
        await state.delete(*stale)
        await state.aclose()


def _retries(metric_reader: Any, reason: str) -> int:
    return sum(
        p.value
        for p in metric_points(metric_reader, "cachesync.retries")
        if p.attributes.get("reason") == reason and p.attributes.get("consumer") == "mapper"
    )


async def _committed(role: MapperRole, tp: TopicPartition) -> int:
    return await role.consumer.committed(tp) or 0


async def test_a_dead_letter_topic_down_for_30s_holds_its_batch_and_loses_nothing(
    own_topics: Any, run_roles_bg: Any, region_redis: dict[str, Redis], metric_reader: Any
) -> None:
    """The dead-letter topic deleted for 30 s: the batch with a bad record is put back and
    retried (never a crash), nothing past it is committed, and once the topic is back the
    record is dead-lettered exactly once and the mapper goes on."""
    settings = await own_topics("dlq-down")
    run = uuid.uuid4().hex[:8]
    admin = await _admin(settings)
    await admin.delete_topics([settings.dead_letter_topic])
    down_at = time.monotonic()

    async def deleted() -> bool:
        return settings.dead_letter_topic not in await admin.list_topics()

    await eventually(deleted, what="the dead-letter topic deleted")
    retries_before = _retries(metric_reader, "DeadLetterUnavailable")
    mapper = MapperRole(settings)
    sink = SinkRole(settings, RedisSink("eu-west", settings.region_redis_urls["eu-west"]))
    await run_roles_bg([mapper, sink])
    pub = EventPublisher(settings)
    await pub.start()
    topic = pub.topic_for("photo.uploaded")
    tp = TopicPartition(topic, 0)
    bad = b"not avro at all " + run.encode()
    try:
        meta = await (await pub.producer.send(topic, bad, partition=0))

        async def retried() -> bool:
            return _retries(metric_reader, "DeadLetterUnavailable") >= retries_before + 2

        await eventually(retried, within=25, what="the batch put back and retried")
        assert await _committed(mapper, tp) <= meta.offset, "committed past an undelivered record"
        assert time.monotonic() - down_at < 30

        await asyncio.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        assert await _committed(mapper, tp) <= meta.offset, "committed during the outage"
        await apply_topics(
            settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix
        )

        # After the outage: a valid event behind the bad one on the same partition.
        wedding = f"w-{run}"
        await cache_put(region_redis["eu-west"], f"wedding:{wedding}:gallery", b"stale")
        photo = new_event(
            "photo.uploaded",
            wedding_id=wedding,
            photo_id="p1",
            album_id=None,
            path=f"/weddings/{wedding}/photos/p1.jpg",
            content_type="image/jpeg",
            size_bytes=1,
        )
        await (
            await pub.producer.send(topic, pub.codec.encode("photo.uploaded", photo), partition=0)
        )
    finally:
        await pub.stop()
        await admin.close()

    async def went_on() -> bool:
        return not await region_redis["eu-west"].exists(f"wedding:{wedding}:gallery")

    await eventually(went_on, within=30, what="the event behind the bad one applied")

    async def committed_past() -> bool:
        return await _committed(mapper, tp) > meta.offset + 1

    await eventually(committed_past, what="the partition committed past both records")
    letters = [
        r
        for r in await _records(settings, [settings.dead_letter_topic])
        if headers.header(r, headers.DLQ_OFFSET) == str(meta.offset).encode()
        and headers.header(r, headers.DLQ_PARTITION) == str(meta.partition).encode()
        and headers.header(r, headers.DLQ_TOPIC) == topic.encode()
    ]
    assert len(letters) == 1, f"dead-lettered {len(letters)} times"
    assert letters[0].value == bad
    assert headers.header(letters[0], headers.DLQ_REASON) == b"undecodable"


async def _max_message_bytes(settings: Settings) -> int:
    """The broker's message.max.bytes, or the dead-letter topic's max.message.bytes if lower."""
    admin = await _admin(settings)
    try:
        answers = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.BROKER, "1", {"message.max.bytes": None}),
                ConfigResource(
                    ConfigResourceType.TOPIC,
                    settings.dead_letter_topic,
                    {"max.message.bytes": None},
                ),
            ]
        )
    finally:
        await admin.close()
    limits = [
        int(entry[1])
        for answer in answers
        for resource in answer.resources
        for entry in resource[4]
        if entry[0] in ("message.max.bytes", "max.message.bytes")
    ]
    assert len(limits) == 2, limits
    return min(limits)


async def test_an_event_near_the_broker_limit_is_dead_lettered_truncated_and_the_mapper_goes_on(
    settings: Settings, topics: list[str], run_roles_bg: Any, region_redis: dict[str, Redis]
) -> None:
    """Bad input 1 KiB under the broker's message.max.bytes, whose own headers leave no room
    for the dlq.* ones: dead-lettered as its origin, its first 64 KiB and the reason; the
    mapper does not crash and maps the next event."""
    limit = await _max_message_bytes(settings)
    run = uuid.uuid4().hex[:8]
    value = run.encode() + b"\x00" * (limit - 1024 - len(run))
    key = f"big-{run}".encode()
    own = [("traceparent", f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01".encode())]
    # The platform's baggage fills the record up to 100 bytes under the limit.
    room = (
        limit
        - 100
        - DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [*own, ("baggage", b"")])
    )
    own.append(("baggage", b"x" * room))
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, own)
    assert limit - 200 < size <= limit, "the event itself must fit, the dlq.* headers not"

    sinks = [SinkRole(settings, RedisSink(r, u)) for r, u in settings.region_redis_urls.items()]
    mapper = MapperRole(settings)
    stop = await run_roles_bg([mapper, *sinks])
    wedding = f"w-{run}"
    for redis in region_redis.values():
        await cache_put(redis, f"wedding:{wedding}:gallery", b"stale")
    pub = EventPublisher(settings)
    await pub.start()
    topic = pub.topic_for("photo.uploaded")
    try:
        meta = await (await pub.producer.send(topic, value, key=key, headers=own, partition=1))
        after = new_event(
            "photo.uploaded",
            wedding_id=wedding,
            photo_id="p1",
            album_id=None,
            path=f"/weddings/{wedding}/photos/p1.jpg",
            content_type="image/jpeg",
            size_bytes=1,
        )
        await (
            await pub.producer.send(topic, pub.codec.encode("photo.uploaded", after), partition=1)
        )
    finally:
        await pub.stop()

    async def went_on() -> bool:
        return not any(
            [await r.exists(f"wedding:{wedding}:gallery") for r in region_redis.values()]
        )

    await eventually(went_on, within=30, what="the event after the large one applied")
    assert not stop.is_set()
    letters = [
        r
        for r in await _records(settings, [settings.dead_letter_topic])
        # A record's origin is topic, partition and offset: other tests of the session
        # dead-letter records of the same topic, at the same offset of another partition.
        if headers.header(r, headers.DLQ_TOPIC) == topic.encode()
        and headers.header(r, headers.DLQ_PARTITION) == str(meta.partition).encode()
        and headers.header(r, headers.DLQ_OFFSET) == str(meta.offset).encode()
    ]
    assert len(letters) == 1
    letter = letters[0]
    assert letter.value == value[:KEPT_VALUE_BYTES]
    assert letter.key == key
    assert headers.header(letter, headers.DLQ_REASON) == b"oversized"
    assert headers.header(letter, headers.DLQ_PARTITION) == b"1"
    assert headers.header(letter, headers.DLQ_TRUNCATED) == b"true"
    assert headers.header(letter, headers.DLQ_ORIGINAL_BYTES) == str(len(value)).encode()


async def test_a_command_the_broker_refuses_dead_letters_its_event_and_the_mapper_goes_on(
    own_topics: Any, run_roles_bg: Any, region_redis: dict[str, Redis]
) -> None:
    """One region's command topic lowered to 64 KiB per message while the mapper runs: the
    event whose commands exceed it is dead-lettered with the reason (no endless retry), its
    commands reach the other regions, and the events around it reach every region."""
    settings = await own_topics("refused")
    run = uuid.uuid4().hex[:8]
    wedding = f"w-{run}"
    small = settings.commands_topic("us-east")
    sink = SinkRole(settings, RedisSink("eu-west", settings.region_redis_urls["eu-west"]))
    mapper = MapperRole(settings)
    await run_roles_bg([mapper, sink])
    since = int(time.time() * 1000)
    admin = await _admin(settings)
    try:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, small, {"max.message.bytes": "65536"})]
        )
    finally:
        await admin.close()
    photos = {name: f"{name}-{run}" for name in ("before", "huge", "after")}
    for photo in photos.values():
        await cache_put(region_redis["eu-west"], f"photo:{photo}", b"stale")
    # A 100 KB path: its purge and warm are over 64 KiB, the others' a few hundred bytes.
    suffix = {"huge": "?v=" + "9" * 100_000}
    events = {
        name: new_event(
            "photo.updated",
            wedding_id=wedding,
            photo_id=photo,
            album_id=None,
            path=f"/weddings/{wedding}/photos/{photo}.jpg{suffix.get(name, '')}",
            changed_fields=["caption"],
        )
        for name, photo in photos.items()
    }
    pub = EventPublisher(settings)
    await pub.start()
    try:
        for name in ("before", "huge", "after"):
            await pub.publish("photo.updated", events[name])
    finally:
        await pub.stop()

    async def all_purged_in_eu_west() -> bool:
        return not any(
            [await region_redis["eu-west"].exists(f"photo:{p}") for p in photos.values()]
        )

    await eventually(all_purged_in_eu_west, within=30, what="eu-west purged all three photos")

    async def dead_lettered() -> list[Record]:
        return [
            r
            for r in await _records(settings, [settings.dead_letter_topic])
            if headers.header(r, headers.DLQ_REASON) == b"command_refused"
        ]

    async def one_letter() -> bool:
        return len(await dead_lettered()) >= 1

    await eventually(one_letter, what="the refused event dead-lettered")
    letters = await dead_lettered()
    assert len(letters) == 1
    assert (
        mapper.codec.decode(letters[0].value or b"").record["event_id"]
        == events["huge"]["event_id"]
    )
    error = headers.header(letters[0], headers.DLQ_ERROR) or b""
    assert small.encode() in error and b"TooLarge" in error, error

    ids = {str(e["event_id"]) for e in events.values()}
    sent = await _commands(settings, mapper.codec, ids, since)
    by_region = {
        region: {c.origin_event_id for c, _ in sent if c.region == region and c.kind == "purge"}
        for region in settings.topology.regions
    }
    assert by_region["us-east"] == ids - {events["huge"]["event_id"]}
    assert by_region["eu-west"] == by_region["ap-southeast"] == ids

    # The audit says the same: the refused event's mapper record (written with its
    # commands, before the broker answered) is taken back, the others stand.
    huge = str(events["huge"]["event_id"])
    view = await read_trace(settings, huge, since_ms=since)
    assert view.mapper is None and len(view.dead_letters) == 1
    assert all(c.sinks for c in view.commands.values())  # only commands a sink reported on
    taken_back = [
        a
        for r in await _records(settings, [settings.audit_topic], since)
        for a in decode_audits(mapper.codec, r.value or b"")
        if a.event_id == huge and a.stage == "mapper"
    ]
    assert [a.outcome for a in taken_back] == ["mapped", "dead_lettered"]
    assert "command_refused" in taken_back[-1].detail
    for name in ("before", "after"):
        view = await read_trace(settings, str(events[name]["event_id"]), since_ms=since)
        assert view.mapper is not None and view.mapper.outcome == "mapped"
        assert len(view.commands) == len(view.mapper.commands) > 0
