"""CommandWriter through a fake producer: topic per region, key per entity, headers, decodable values."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import murmur2
from opentelemetry import trace

from cachesync.consumers.commands import Command, PurgeCommand, WarmCommand
from cachesync.consumers.errors import TransientError
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.writer import CommandWriter
from cachesync.schemas import SchemaCatalog, SingleObjectCodec

CODEC = SingleObjectCodec(SchemaCatalog())
PARTITIONS = 6


def topic_for(region: str) -> str:
    return f"test.cache.commands.{region}"


@dataclass
class Sent:
    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


@dataclass
class FakeBatch:
    messages: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )

    def close(self) -> None:  # a complete batch, as BatchedSends hands it over
        pass

    def append(
        self,
        *,
        key: bytes | None,
        value: bytes,
        timestamp: int | None,
        headers: list[tuple[str, bytes]],
    ) -> object:
        self.messages.append((key, value, headers))
        return object()  # metadata: the message fit


class FakeProducer:
    """What BatchedSends uses of AIOKafkaProducer; records what was sent, per message."""

    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[Sent] = []
        self.error = error

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(self.error)
            return future
        for key, value, hdrs in batch.messages:
            self.sent.append(Sent(topic, partition, key, value, dict(hdrs)))
        future.set_result(None)
        return future


def purge(n: int, *, region: str = "eu-west", entity: str = "wedding:w1") -> PurgeCommand:
    return PurgeCommand(
        command_id=f"cmd-purge-{n}",
        origin_event_id=f"ev-{n}",
        origin_event_type="photo.updated",
        origin_occurred_at=1_764_000_000_000 + n,
        region=region,
        entity=entity,
        version=1_764_000_000_000 + n,
        issued_at=1_764_000_000_100 + n,
        scope="wedding",
        keys=(f"{entity}:gallery",),
        tags=(entity,),
        urls=(f"/weddings/{n}",),
    )


def warm(n: int, *, region: str = "eu-west", entity: str = "wedding:w1") -> WarmCommand:
    return WarmCommand(
        command_id=f"cmd-warm-{n}",
        origin_event_id=f"ev-{n}",
        origin_event_type="photo.updated",
        origin_occurred_at=1_764_000_000_000 + n,
        region=region,
        entity=entity,
        version=1_764_000_000_000 + n,
        issued_at=1_764_000_000_100 + n,
        wedding_id="w1",
        photo_urls=("/weddings/w1/photos/1",),
        deadline=1_764_000_060_000,
    )


async def write(commands: list[Command], **options: object) -> list[Sent]:
    producer = FakeProducer()
    writer = CommandWriter(producer, CODEC, topic_for, **options)  # type: ignore[arg-type]
    writer.add(commands)
    assert len(writer) == len(commands)
    await writer.send()
    assert len(writer) == 0
    return producer.sent


def decoded(sent: Sent) -> Command:
    result = CODEC.decode(sent.value)
    kind = {"purge": PurgeCommand, "warm": WarmCommand}[result.type_name]
    command: Command = kind.from_record(result.record)
    return command


async def test_each_command_goes_to_its_regions_topic_keyed_by_entity() -> None:
    """Topic is topic_for(command.region), key the entity, partition murmur2(entity), order kept per entity."""
    commands: list[Command] = [
        purge(1, region="eu-west", entity="wedding:w1"),
        purge(2, region="us-east", entity="wedding:w1"),
        purge(3, region="eu-west", entity="vendor:v9"),
        warm(4, region="eu-west", entity="wedding:w1"),
    ]

    sent = await write(commands)

    by_id = {decoded(s).command_id: s for s in sent}
    assert set(by_id) == {c.command_id for c in commands}
    for command in commands:
        message = by_id[command.command_id]
        assert message.topic == topic_for(command.region)
        assert message.key == command.entity.encode()
        assert message.partition == (murmur2(command.entity.encode()) & 0x7FFFFFFF) % PARTITIONS
    eu_w1 = [
        decoded(s).command_id
        for s in sent
        if s.topic == topic_for("eu-west") and s.key == b"wedding:w1"
    ]
    assert eu_w1 == ["cmd-purge-1", "cmd-warm-4"]


async def test_values_decode_with_the_same_codec_to_the_same_commands() -> None:
    """Each value decodes (single-object Avro) to a record equal to the command written."""
    commands: list[Command] = [purge(1), warm(2)]

    sent = await write(commands)

    assert [CODEC.decode(s.value).type_name for s in sent] == ["purge", "warm"]
    assert [decoded(s) for s in sent] == commands


async def test_live_commands_carry_kind_and_event_id_and_no_replay_marks() -> None:
    """A live writer sets KIND and EVENT_ID and neither REPLAY nor REPLAY_CDN."""
    sent = await write([purge(1), warm(2)])

    assert [(s.headers[headers.KIND], s.headers[headers.EVENT_ID]) for s in sent] == [
        (b"purge", b"ev-1"),
        (b"warm", b"ev-2"),
    ]
    for message in sent:
        assert headers.REPLAY not in message.headers
        assert headers.REPLAY_CDN not in message.headers


@pytest.mark.parametrize(
    ("cdn", "cdn_header"), [(True, None), (False, b"off")], ids=["cdn", "no-cdn"]
)
async def test_a_replay_writer_marks_every_command(cdn: bool, cdn_header: bytes | None) -> None:
    """replay_id sets REPLAY on every command; cdn=False adds REPLAY_CDN: off, cdn=True does not."""
    sent = await write([purge(1), warm(2), purge(3, region="us-east")], replay_id="r-42", cdn=cdn)

    assert len(sent) == 3
    for message in sent:
        assert message.headers[headers.REPLAY] == b"r-42"
        assert message.headers.get(headers.REPLAY_CDN) == cdn_header
        assert headers.KIND in message.headers and headers.EVENT_ID in message.headers


async def test_commands_added_in_a_span_carry_its_trace_context() -> None:
    """Commands added while a span is current carry a traceparent naming that span's trace."""
    with trace.get_tracer("tests").start_as_current_span("map") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        sent = await write([purge(1), warm(2)])

    for message in sent:
        assert trace_id in message.headers["traceparent"].decode()


async def test_a_broker_error_on_send_is_a_transient_error_and_empties_the_writer() -> None:
    """A KafkaError from the producer surfaces as TransientError; the writer is left empty."""
    producer = FakeProducer(error=KafkaTimeoutError())
    writer = CommandWriter(producer, CODEC, topic_for)  # type: ignore[arg-type]
    writer.add([purge(1)])

    with pytest.raises(TransientError):
        await writer.send()
    assert len(writer) == 0
