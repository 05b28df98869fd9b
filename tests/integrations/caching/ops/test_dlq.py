"""`cachesync dlq` on the real stack: dead letters listed and shown with their origin, a
rule error re-driven after the fix (dry run first, then for real, refused a second time,
allowed when forced), and what cannot be re-driven reported."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from click.testing import Result
from redis.asyncio import Redis
from typer.testing import CliRunner

from cachesync.consumers import keys
from cachesync.consumers.cli.app import app
from cachesync.consumers.ops.dlq import (
    ALREADY,
    MISSING_TOPIC,
    SENT,
    TRUNCATED,
    WOULD_FAIL,
    WOULD_SEND,
    find_dead_letter,
    read_dead_letters,
    redrive,
)
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.ops.trace import read_trace
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.kafka import Record, make_producer, partitions_of
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole, run_roles
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.topology import DEFAULT_TOPOLOGY, load_topology
from cachesync.topology.admin import apply_topics
from tests.helpers import eventually

pytestmark = pytest.mark.integration

GARBAGE = b'{"photo": "as json, not Avro"}'


@dataclass
class Origin:
    topic: str
    partition: int
    offset: int
    timestamp: int


@dataclass
class Poisoned:
    """What the broken mapper dead-lettered, found by reading the dead-letter topic directly."""

    run: str
    since_ms: int
    photos_topic: str
    rule_error_id: str  # a photo.deleted whose rule named a missing field
    rule_error_event_id: str
    rule_error_origin: Origin
    rule_error_value: bytes
    undecodable_id: str
    undecodable_origin: Origin
    stale_key: str  # purged by the photo.deleted once it is mapped by the right rules


@pytest.fixture(scope="module")
async def dlq_settings(settings: Settings) -> AsyncIterator[Settings]:
    """Topics and groups of this module's own, so its dead-letter topic holds only its records."""
    own = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}dlq.",
            "group_prefix": f"{settings.group_prefix}-dlq",
        }
    )
    await apply_topics(own.kafka_bootstrap_servers, own.topology, own.topic_prefix)
    yield own
    state = Redis.from_url(str(own.state_redis_url))
    await state.delete(keys.dlq_redriven(own.dead_letter_topic))
    await state.aclose()


@pytest.fixture(scope="module")
async def poisoned(dlq_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Poisoned:
    """A mapper whose photo.deleted rule names a field events lack (a bad deploy) meets a
    photo.deleted, bytes that are not Avro and a good photo.uploaded; it is stopped after."""
    s = dlq_settings
    run = uuid.uuid4().hex[:8]
    since_ms = int(time.time() * 1000) - 1
    tag = [("test-run", run.encode())]
    wedding = f"w-{run}"
    stale_key = f"wedding:{wedding}:gallery"
    for url in s.region_redis_urls.values():
        redis = Redis.from_url(url)
        await cache_put(redis, stale_key, b"stale")
        await redis.aclose()

    mapper = MapperRole(s)
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    data["rules"]["photo.deleted"]["purge"]["keys"] = ["photo:{photographer_id}"]
    path = tmp_path_factory.mktemp("dlq") / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    mapper.mapper.topology = load_topology(path)
    mapper.mapper.regions = list(mapper.mapper.topology.regions)
    stop = asyncio.Event()
    task = asyncio.create_task(run_roles([mapper], stop))

    pub = EventPublisher(s)
    await pub.start()
    topic = pub.topic_for("photo.deleted")
    deleted = new_event(
        "photo.deleted",
        wedding_id=wedding,
        photo_id=f"ph-{run}",
        album_id=None,
        path=f"/weddings/{wedding}/photos/ph-{run}.jpg",
    )
    try:
        value = pub.codec.encode("photo.deleted", deleted)
        sent = await (await pub.producer.send(topic, value, key=wedding.encode(), headers=[*tag]))
        rule_origin = Origin(sent.topic, sent.partition, sent.offset, sent.timestamp)
        sent = await (await pub.producer.send(topic, GARBAGE, key=b"k", headers=[*tag]))
        garbage_origin = Origin(sent.topic, sent.partition, sent.offset, sent.timestamp)
        good = new_event(
            "photo.uploaded",
            wedding_id=f"w-{run}-good",
            photo_id=f"ph-{run}-good",
            album_id=None,
            path=f"/weddings/w-{run}-good/photos/ph-{run}-good.jpg",
            content_type="image/jpeg",
            size_bytes=1,
        )
        await pub.publish("photo.uploaded", good, headers=[*tag])
    finally:
        await pub.stop()

    found = await _raw_dead_letters(s, run, expected=2)
    stop.set()
    await asyncio.wait_for(task, timeout=30)
    by_reason = {dict(r.headers)["dlq.reason"].decode(): r for r in found}
    assert set(by_reason) == {"rule_error", "undecodable"}, sorted(by_reason)
    rule, garbage = by_reason["rule_error"], by_reason["undecodable"]
    return Poisoned(
        run=run,
        since_ms=since_ms,
        photos_topic=topic,
        rule_error_id=f"{rule.partition}:{rule.offset}",
        rule_error_event_id=str(deleted["event_id"]),
        rule_error_origin=rule_origin,
        rule_error_value=value,
        undecodable_id=f"{garbage.partition}:{garbage.offset}",
        undecodable_origin=garbage_origin,
        stale_key=stale_key,
    )


async def test_list_and_show_give_reason_origin_consumer_time_and_event(
    dlq_settings: Settings, poisoned: Poisoned
) -> None:
    """Each dead letter is listed by its `partition:offset` with its headers' story and, when it decodes, its event."""
    letters = {
        letter.id: letter
        for letter in await read_dead_letters(dlq_settings, since_ms=poisoned.since_ms)
    }
    assert {poisoned.rule_error_id, poisoned.undecodable_id} <= set(letters)

    rule = letters[poisoned.rule_error_id]
    o = poisoned.rule_error_origin
    assert (rule.reason, rule.consumer) == ("rule_error", "mapper")
    assert (rule.topic, rule.partition, rule.offset, rule.timestamp) == (
        o.topic,
        o.partition,
        o.offset,
        o.timestamp,
    )
    assert "photographer_id" in rule.error
    assert rule.dead_lettered_at >= o.timestamp
    assert (rule.kind, rule.event_type, rule.event_id) == (
        "event",
        "photo.deleted",
        poisoned.rule_error_event_id,
    )

    bad = letters[poisoned.undecodable_id]
    o = poisoned.undecodable_origin
    assert (bad.reason, bad.consumer) == ("undecodable", "mapper")
    assert (bad.topic, bad.partition, bad.offset) == (o.topic, o.partition, o.offset)
    assert bad.error
    assert (bad.kind, bad.event_type, bad.event_id) == (None, None, None)
    assert bad.value == GARBAGE

    shown = await find_dead_letter(dlq_settings, poisoned.rule_error_id)
    assert shown is not None and shown.record is not None
    assert shown.record["event_id"] == poisoned.rule_error_event_id
    assert ("test-run", poisoned.run.encode()) in shown.headers
    assert not [k for k, _ in shown.headers if k.startswith("dlq.")]
    assert await find_dead_letter(dlq_settings, "0:999999") is None

    undecodable = await read_dead_letters(
        dlq_settings, since_ms=poisoned.since_ms, reasons=["undecodable"]
    )
    assert [letter.id for letter in undecodable] == [poisoned.undecodable_id]


async def test_cli_list_show_and_a_dry_run(dlq_settings: Settings, poisoned: Poisoned) -> None:
    """`cachesync dlq list`, `show ID` and `redrive --dry-run` print what the operator needs."""
    listed = await _cli(dlq_settings, "dlq", "list", "--reason", "rule_error")
    assert listed.exit_code == 0, listed.output
    o = poisoned.rule_error_origin
    for text in (
        poisoned.rule_error_id,
        "rule_error",
        f"{o.topic}[{o.partition}]@{o.offset}",
        "mapper",
        poisoned.rule_error_event_id,
        "photographer_id",
    ):
        assert text in listed.output, text
    assert poisoned.undecodable_id not in listed.output.split()

    shown = await _cli(dlq_settings, "dlq", "show", poisoned.undecodable_id)
    assert shown.exit_code == 0, shown.output
    assert "undecodable" in shown.output and "does not decode" in shown.output
    missing = await _cli(dlq_settings, "dlq", "show", "0:999999")
    assert missing.exit_code == 1

    dry = await _cli(dlq_settings, "dlq", "redrive", "--id", poisoned.undecodable_id, "--dry-run")
    assert dry.exit_code == 1, dry.output
    assert "would fail" in dry.output and "0 of 1" in dry.output


async def test_redrive_after_the_fix_dry_run_real_refused_forced(
    dlq_settings: Settings,
    poisoned: Poisoned,
    region_redis: dict[str, Redis],
    run_roles_bg,
) -> None:
    """A rule error re-driven by reason: a dry run sends nothing, the real run puts the same
    record back on its topic with the redrive header (mapped, purged, traced), a second run
    is refused, a forced one sends it again."""
    s = dlq_settings
    letter_id = poisoned.rule_error_id
    start = await _ends(s, poisoned.photos_topic)

    dry = await redrive(s, reasons=["rule_error"], dry_run=True)
    assert [(o.letter.id, o.outcome) for o in dry.outcomes] == [(letter_id, WOULD_SEND)]
    assert await _ends(s, poisoned.photos_topic) == start, "a dry run sent something"
    for redis in region_redis.values():
        assert await redis.exists(poisoned.stale_key), "purged before the re-drive"

    # The fix is deployed: the mapper with the right rules, in the same group, and the sinks.
    sinks = [SinkRole(s, RedisSink(r, u)) for r, u in s.region_redis_urls.items()]
    await run_roles_bg([MapperRole(s), *sinks])
    report = await redrive(s, reasons=["rule_error"])
    assert [(o.letter.id, o.outcome) for o in report.outcomes] == [(letter_id, SENT)]

    (copy,) = await _records_since(s, start)
    assert copy.value == poisoned.rule_error_value
    assert copy.key == f"w-{poisoned.run}".encode()
    sent_headers = [(k, bytes(v)) for k, v in copy.headers]
    assert (headers.REDRIVE, letter_id.encode()) in sent_headers
    assert ("test-run", poisoned.run.encode()) in sent_headers
    assert not [k for k, _ in sent_headers if k.startswith("dlq.")]

    async def purged_everywhere() -> bool:
        for redis in region_redis.values():
            if await redis.exists(poisoned.stale_key):
                return False
        return True

    await eventually(purged_everywhere, what="the re-driven photo.deleted was not applied")

    async def traced() -> bool:
        view = await read_trace(s, poisoned.rule_error_event_id, since_ms=poisoned.since_ms)
        return view.mapper is not None and view.event_type == "photo.deleted"

    await eventually(traced, what="no mapper audit record for the re-driven event")
    (listed,) = await read_dead_letters(s, ids=[letter_id])
    assert listed.redriven is not None
    assert listed.redriven.sent_to == f"{copy.topic}[{copy.partition}]@{copy.offset}"

    after_first = await _ends(s, poisoned.photos_topic)
    again = await redrive(s, reasons=["rule_error"])
    assert [(o.letter.id, o.outcome) for o in again.outcomes] == [(letter_id, ALREADY)]
    assert await _ends(s, poisoned.photos_topic) == after_first, "a refused re-drive sent"

    forced = await redrive(s, reasons=["rule_error"], force=True)
    assert [(o.letter.id, o.outcome) for o in forced.outcomes] == [(letter_id, SENT)]
    (second,) = await _records_since(s, after_first)
    assert (headers.REDRIVE, letter_id.encode()) in [(k, bytes(v)) for k, v in second.headers]
    assert second.value == poisoned.rule_error_value


async def test_what_cannot_be_redriven_is_reported_not_sent(
    dlq_settings: Settings, poisoned: Poisoned
) -> None:
    """Bytes that still do not decode, a dead letter whose topic is gone, one kept truncated
    (refused even when forced: its origin topic exists and its prefix is a valid event) and
    an unknown id are each reported with why; nothing is sent."""
    s = dlq_settings
    gone = f"{s.topic_prefix}content.gone-{poisoned.run}"
    producer = make_producer(s.kafka_bootstrap_servers, client_id="test-dlq")
    await producer.start()
    try:
        sent = await (
            await producer.send(
                s.dead_letter_topic,
                b"whatever",
                key=b"k",
                headers=[
                    (headers.DLQ_REASON, b"permanent"),
                    (headers.DLQ_ERROR, b"400 from the provider"),
                    (headers.DLQ_CONSUMER, b"sink.eu-west.cloudflare"),
                    (headers.DLQ_TOPIC, gone.encode()),
                    (headers.DLQ_PARTITION, b"0"),
                    (headers.DLQ_OFFSET, b"7"),
                    (headers.DLQ_TIMESTAMP, b"0"),
                ],
            )
        )
        # A valid event as the prefix: only the truncation mark can refuse it.
        sent_truncated = await (
            await producer.send(
                s.dead_letter_topic,
                poisoned.rule_error_value,
                key=b"k",
                headers=[
                    (headers.DLQ_REASON, b"oversized"),
                    (headers.DLQ_ERROR, b"1,048,000 bytes"),
                    (headers.DLQ_CONSUMER, b"mapper"),
                    (headers.DLQ_TOPIC, poisoned.photos_topic.encode()),
                    (headers.DLQ_PARTITION, b"0"),
                    (headers.DLQ_OFFSET, b"3"),
                    (headers.DLQ_TIMESTAMP, b"0"),
                    (headers.DLQ_TRUNCATED, b"true"),
                    (headers.DLQ_ORIGINAL_BYTES, b"1048000"),
                ],
            )
        )
    finally:
        await producer.stop()
    orphan = f"{sent.partition}:{sent.offset}"
    truncated = f"{sent_truncated.partition}:{sent_truncated.offset}"
    start = await _ends(s, poisoned.photos_topic)

    forced = await redrive(s, ids=[truncated], force=True)
    assert [o.outcome for o in forced.outcomes] == [TRUNCATED]
    assert "1,048,000 bytes" in forced.outcomes[0].detail
    assert f"{poisoned.photos_topic}[0]@3" in forced.outcomes[0].detail
    report = await redrive(s, ids=[poisoned.undecodable_id, orphan, "0:999999"])
    outcomes = {o.letter.id: o for o in report.outcomes}
    assert outcomes[poisoned.undecodable_id].outcome == WOULD_FAIL
    assert outcomes[poisoned.undecodable_id].detail.startswith("undecodable")
    assert outcomes[orphan].outcome == MISSING_TOPIC
    assert gone in outcomes[orphan].detail
    assert report.unknown_ids == ["0:999999"]
    assert not report.sent
    assert await _ends(s, poisoned.photos_topic) == start
    with pytest.raises(ValueError):
        await redrive(s)


async def _cli(settings: Settings, *args: str) -> Result:
    """The command line, as an operator runs it against this module's topics (in a thread:
    the command runs its own event loop)."""
    env = {"CACHESYNC_TOPIC_PREFIX": settings.topic_prefix, "COLUMNS": "400"}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def _raw_dead_letters(settings: Settings, run: str, *, expected: int) -> list[Record]:
    """This run's records on the dead-letter topic, read with a plain consumer."""
    consumer = AIOKafkaConsumer(
        settings.dead_letter_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[Record] = []
    try:

        async def collect() -> bool:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found.extend(r for r in records if dict(r.headers).get("test-run") == run.encode())
            return len(found) >= expected

        await eventually(collect, what=f"{expected} dead letters")
    finally:
        await consumer.stop()
    return found


async def _ends(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        tps = await partitions_of(settings.kafka_bootstrap_servers, [topic])
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def _records_since(settings: Settings, starts: dict[TopicPartition, int]) -> list[Record]:
    """Every record the topic got after `starts`, read from the topic itself."""
    ends = await _ends(settings, next(iter(starts)).topic)
    wanted = {tp: end for tp, end in ends.items() if end > starts[tp]}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    found: list[Record] = []
    try:
        consumer.assign(list(wanted))
        for tp in wanted:
            consumer.seek(tp, starts[tp])

        async def read() -> bool:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found.extend(
                    r for r in records if r.offset < wanted[TopicPartition(r.topic, r.partition)]
                )
            return len(found) >= sum(end - starts[tp] for tp, end in wanted.items())

        await eventually(read, what="the topic's new records")
    finally:
        await consumer.stop()
    return found
