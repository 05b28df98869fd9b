"""AuditRecord through the real codec, decode_audit on other messages, and the writer's detail cap."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field, fields

import pytest

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.pipeline.audit import AuditLog, AuditRecord, decode_audit
from cachesync.consumers.sinks.base import Note
from cachesync.schemas import SchemaCatalog, SingleObjectCodec
from cachesync.schemas.serde import SINGLE_OBJECT_MAGIC
from tests.samples import sample_record

CODEC = SingleObjectCodec(SchemaCatalog())


def full_record() -> AuditRecord:
    """A sink-stage record with every field set, times off whole seconds."""
    return AuditRecord(
        event_id="ev-123",
        event_type="photo.updated",
        stage="sink",
        command_id="cmd-1",
        region="eu-west",
        sink="cloudflare",
        kind="purge",
        outcome="applied",
        detail="purged 3 tags",
        provider_ids=("cf-req-1", "cf-req-2"),
        cache_status={"/weddings/w1": "MISS", "/weddings/w1/gallery": "HIT"},
        commands=("eu-west/purge/cmd-1", "eu-west/warm/cmd-2"),
        keys=("wedding:w1:gallery", "photo:p1"),
        tags=("wedding:w1:photos",),
        urls=("/weddings/w1", "/weddings/w1/gallery"),
        occurred_at=1_764_000_123_457,
        recorded_at=1_764_000_124_001,
        latency_ms=544,
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )


def purge_command() -> PurgeCommand:
    return PurgeCommand(
        command_id="cmd-purge-1",
        origin_event_id="ev-1",
        origin_event_type="photo.updated",
        origin_occurred_at=1_764_000_000_001,
        region="eu-west",
        entity="wedding:w1",
        version=1_764_000_000_001,
        issued_at=1_764_000_000_101,
        scope="wedding",
        keys=("wedding:w1:gallery",),
        tags=("wedding:w1",),
        urls=("/weddings/w1",),
    )


def test_full_record_round_trips_through_the_codec() -> None:
    """Every field set: encode(to_record) then decode_audit / from_record gives an equal record."""
    record = full_record()
    value = CODEC.encode("audit", record.to_record())

    decoded = CODEC.decode(value)
    assert decoded.type_name == "audit"
    assert AuditRecord.from_record(decoded.record) == record
    back = decode_audit(CODEC, value)
    assert back == record
    assert back is not None
    for f in fields(AuditRecord):
        assert getattr(back, f.name) == getattr(record, f.name), f.name
    # Arrays come back as tuples and times as epoch ms, not lists and datetimes.
    assert isinstance(back.provider_ids, tuple) and isinstance(back.urls, tuple)
    assert type(back.occurred_at) is int and type(back.recorded_at) is int


def test_record_with_defaults_round_trips_through_the_codec() -> None:
    """A mapper-stage record with only the required fields (None, "", empty) round-trips equal."""
    record = AuditRecord(
        event_id="ev-9",
        event_type="wedding.updated",
        stage="mapper",
        kind="event",
        outcome="mapped",
        occurred_at=999,
        recorded_at=1_000,
    )
    assert decode_audit(CODEC, CODEC.encode("audit", record.to_record())) == record


@pytest.mark.parametrize(
    ("type_name", "record"),
    [
        pytest.param("purge", purge_command().to_record(), id="purge-command"),
        pytest.param("photo.updated", sample_record("photo.updated"), id="event"),
    ],
)
def test_decode_audit_is_none_for_another_type(type_name: str, record: dict[str, object]) -> None:
    """A well-formed message of another type (a purge command, an event) is no audit record."""
    value = CODEC.encode(type_name, record)
    assert CODEC.decode(value).type_name == type_name  # it does decode, just not as audit
    assert decode_audit(CODEC, value) is None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00" + random.Random(7).randbytes(63), id="random-bytes"),
        pytest.param(b'{"event_id": "ev-1"}', id="json"),
        pytest.param(SINGLE_OBJECT_MAGIC + b"\xff" * 8 + b"\x02", id="unknown-fingerprint"),
        pytest.param(
            CODEC.encode("audit", full_record().to_record())[:-5], id="truncated-audit-record"
        ),
        pytest.param(
            CODEC.encode("audit", full_record().to_record()) + b"\x00", id="trailing-bytes"
        ),
    ],
)
def test_decode_audit_is_none_for_bytes_that_hold_no_record(value: bytes) -> None:
    """Bytes the codec cannot decode give None rather than an error."""
    assert decode_audit(CODEC, value) is None


@dataclass
class FakeBatch:
    messages: list[tuple[bytes | None, bytes]] = field(default_factory=list)

    def append(
        self, *, key: bytes | None, value: bytes, timestamp: None, headers: object
    ) -> object:
        self.messages.append((key, value))
        return object()


class FakeProducer:
    """What BatchedSends uses of AIOKafkaProducer; keeps (topic, key, value) of each message."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> object:
        self.sent += [(topic, key, value) for key, value in batch.messages]
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def test_sink_record_detail_is_cut_to_2000_characters() -> None:
    """AuditLog.handled writes the note's detail cut to its first 2000 characters, the rest intact."""
    producer = FakeProducer()
    log = AuditLog(producer, "test.cache.audit", CODEC)  # type: ignore[arg-type]
    long_detail = "".join(f"{i:05d}|" for i in range(1_000))  # 6000 characters, no two alike
    command = purge_command()

    await log.handled(command, sink="redis", note=Note(outcome="rejected", detail=long_detail))
    await log.handled(command, sink="warmer", note=Note(outcome="skipped", detail="short"))
    await log.flush()

    assert [(t, k) for t, k, _ in producer.sent] == [("test.cache.audit", b"ev-1")] * 2
    cut, short = (decode_audit(CODEC, value) for _, _, value in producer.sent)
    assert cut is not None and short is not None
    assert cut.detail == long_detail[:2000]
    assert len(cut.detail) == 2000
    assert short.detail == "short"
    assert (cut.event_id, cut.command_id, cut.sink, cut.outcome) == (
        "ev-1",
        "cmd-purge-1",
        "redis",
        "rejected",
    )
    assert (cut.keys, cut.tags, cut.urls) == (command.keys, command.tags, command.urls)
