"""AuditRecord through the real codec, decode_audit on other messages, the writer's detail cap,
and the sinks' records per flush (one per outcome and partition, expanded per command)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field, fields, replace

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import murmur2

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import TransientError
from cachesync.consumers.pipeline import audit
from cachesync.consumers.pipeline.audit import (
    AuditLog,
    AuditRecord,
    HandledCommand,
    MappedEvent,
    decode_audit,
    decode_audits,
)
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
    messages: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )

    def close(self) -> None:  # a complete batch, as BatchedSends hands it over
        pass

    def append(
        self, *, key: bytes | None, value: bytes, timestamp: None, headers: list[tuple[str, bytes]]
    ) -> object:
        self.messages.append((key, value, headers))
        return object()


class FakeProducer:
    """What BatchedSends uses of AIOKafkaProducer; keeps (topic, key, value) of each message."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.partitions: list[int] = []  # per message sent, the partition it was sent to
        self.headers: list[list[tuple[str, bytes]]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> object:
        self.sent += [(topic, key, value) for key, value, _ in batch.messages]
        self.partitions += [partition] * len(batch.messages)
        self.headers += [headers for _, _, headers in batch.messages]
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


def purges(n: int) -> list[PurgeCommand]:
    """`n` purges of as many events, in eu-west."""
    return [
        replace(
            purge_command(),
            **{
                "command_id": f"cmd-{i}",
                "origin_event_id": f"ev-{i}",
                "keys": (f"wedding:w{i}:gallery",),
                "tags": (f"wedding:w{i}",),
                "urls": (f"/weddings/w{i}",),
            },
        )
        for i in range(n)
    ]


def partition_of(event_id: str) -> int:
    """The audit partition (of FakeProducer's 3) the default partitioner gives an event id."""
    return (murmur2(event_id.encode()) & 0x7FFFFFFF) % 3


def expand_sent(producer: FakeProducer) -> list[AuditRecord]:
    """Every record the producer was given, expanded, after checking each message: sent to
    its key's partition, about events of that partition only, marked when about several."""
    expanded: list[AuditRecord] = []
    for (_, key, value), partition, hdrs in zip(
        producer.sent, producer.partitions, producer.headers, strict=True
    ):
        assert key is not None and partition == partition_of(key.decode())
        records = decode_audits(CODEC, value)
        assert {partition_of(r.event_id) for r in records} == {partition}
        assert (len(records) > 1) == (hdrs == [("cachesync.audit-batch", b"1")])
        expanded += records
    return expanded


async def test_a_flush_writes_one_record_per_outcome_and_partition_keeping_every_command() -> None:
    """A sink's 30 commands (27 applied, 3 rejected) become one record per (outcome, audit
    partition), each keyed by an event of its partition and marked when about several, and
    expand back to 30 records, one per command, with its own event, outcome, detail, keys
    and trace id."""
    producer = FakeProducer()
    log = AuditLog(producer, "test.cache.audit", CODEC)  # type: ignore[arg-type]
    commands = purges(30)
    rejected = {"cmd-3", "cmd-10", "cmd-17"}
    for c in commands:
        if c.command_id in rejected:
            note = Note(outcome="rejected", detail=f"refused {c.command_id}")
        else:
            note = Note(detail=f"applied {c.command_id}")
        await log.handled(c, sink="redis", note=note, trace_id=f"{c.command_id:0>32}")
    await log.flush()

    groups = {(c.command_id in rejected, partition_of(c.origin_event_id)) for c in commands}
    assert len(producer.sent) == len(groups) < len(commands)
    expanded = expand_sent(producer)
    by_command = {r.command_id: r for r in expanded}
    assert len(expanded) == len(by_command) == 30
    for c in commands:
        r = by_command[c.command_id]
        assert (r.event_id, r.stage, r.sink, r.region, r.kind) == (
            c.origin_event_id,
            "sink",
            "redis",
            "eu-west",
            "purge",
        )
        if c.command_id in rejected:
            assert (r.outcome, r.detail) == ("rejected", f"refused {c.command_id}")
        else:
            assert (r.outcome, r.detail) == ("applied", f"applied {c.command_id}")
        assert (r.keys, r.tags, r.urls) == (c.keys, c.tags, c.urls)
        assert r.trace_id == f"{c.command_id:0>32}"
        assert r.occurred_at == c.origin_occurred_at
        assert r.latency_ms == r.recorded_at - c.origin_occurred_at


async def test_a_record_over_its_byte_budget_is_cut_without_losing_a_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a small RECORD_BYTES, one group's commands go out in several records, each command
    in exactly one of them."""
    monkeypatch.setattr(audit, "RECORD_BYTES", 800)
    producer = FakeProducer()
    log = AuditLog(producer, "test.cache.audit", CODEC)  # type: ignore[arg-type]
    commands = [replace(c, origin_event_id="ev-same") for c in purges(20)]
    for c in commands:
        await log.handled(c, sink="redis", note=Note(), trace_id=None)
    await log.flush()

    assert len(producer.sent) > 2
    assert all(len(value) <= 800 for _, _, value in producer.sent)
    ids = [r.command_id for _, _, value in producer.sent for r in decode_audits(CODEC, value)]
    assert sorted(ids) == sorted(c.command_id for c in commands)


def test_a_v1_record_decodes_with_the_v2_reader() -> None:
    """A record written with audit.v1 (before `handled`) decodes as one record about its
    command, with nothing in `handled`."""
    record = full_record()
    v1 = {k: v for k, v in record.to_record().items() if k != "handled"}
    value = CODEC.encode("audit", v1, version=1)
    assert CODEC.decode(value).writer_version == 1

    assert decode_audits(CODEC, value) == [record]


def test_a_record_about_several_commands_round_trips_and_expands() -> None:
    """A v2 record with `handled` entries round-trips equal, and expands to one record per
    entry, taking the entry's fields and the record's shared ones."""
    entries = tuple(
        HandledCommand(
            command_id=f"cmd-{i}",
            event_id=f"ev-{i}",
            event_type="photo.updated",
            occurred_at=1_764_000_000_000 + i,
            detail="d" if i else "",
            provider_ids=(f"id-{i}",),
            cache_status={"/w": "HIT"} if i else {},
            keys=(f"k{i}",),
            urls=(f"/u{i}",),
            trace_id=f"{i:032x}",
        )
        for i in range(3)
    )
    record = replace(full_record(), handled=entries)

    back = decode_audit(CODEC, CODEC.encode("audit", record.to_record()))
    assert back == record
    expanded = record.expand()

    assert [r.command_id for r in expanded] == ["cmd-0", "cmd-1", "cmd-2"]
    for r, h in zip(expanded, entries, strict=True):
        assert (r.event_id, r.event_type, r.detail, r.provider_ids, r.cache_status) == (
            h.event_id,
            h.event_type,
            h.detail,
            h.provider_ids,
            h.cache_status,
        )
        assert (r.keys, r.tags, r.urls, r.trace_id) == (h.keys, h.tags, h.urls, h.trace_id)
        assert (r.sink, r.region, r.outcome, r.recorded_at) == (
            record.sink,
            record.region,
            record.outcome,
            record.recorded_at,
        )
        assert r.latency_ms == record.recorded_at - h.occurred_at and r.handled == ()


class SendProducer(FakeProducer):
    """`producer.send` too, with acks the test answers (or fails) by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.acks: list[asyncio.Future[object]] = []

    async def send(
        self, topic: str, value: bytes, key: bytes | None, *, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[object]:
        self.sent.append((topic, key, value))
        self.acks.append(asyncio.get_running_loop().create_future())
        return self.acks[-1]


async def test_hand_over_does_not_wait_for_acks_and_acked_raises_if_one_failed() -> None:
    """A sink's records go out per flush without waiting; `acked` waits for every one and
    says so when one was not acknowledged, so that its batch is not committed."""
    producer = SendProducer()
    log = AuditLog(producer, "test.cache.audit", CODEC)  # type: ignore[arg-type]
    command = purge_command()
    log.handled_all("redis", [(command, Note(), None)])
    await log.hand_over()  # returns with the ack still open
    log.handled_all("warmer", [(command, Note(outcome="skipped"), None)])
    await log.hand_over()

    assert [(t, k) for t, k, _ in producer.sent] == [("test.cache.audit", b"ev-1")] * 2
    acked = asyncio.create_task(log.acked())
    await asyncio.sleep(0.01)
    assert not acked.done()  # waits for both
    producer.acks[0].set_result(None)
    producer.acks[1].set_exception(KafkaTimeoutError())
    with pytest.raises(TransientError, match="not acknowledged"):
        await acked
    await log.acked()  # what failed is not waited for twice


async def test_a_mapper_batch_writes_one_record_per_partition_and_expands_to_one_per_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mapper's batch of 20 events becomes one record per audit partition of their
    event ids (keyed by one of them, marked when about several), which expand to one
    mapper record per event with the commands it produced; an event with more commands
    than an entry holds is in several entries, which together list them all."""
    monkeypatch.setattr(audit, "COMMANDS_PER_ENTRY", 4)
    producer = FakeProducer()
    log = AuditLog(producer, "test.cache.audit", CODEC)  # type: ignore[arg-type]
    commands = purges(30)
    events = [
        MappedEvent(
            event_id=f"ev-{i}",
            event_type="photo.uploaded",
            occurred_at=1_764_000_000_000 + i,
            commands=commands[i : i + (10 if i == 7 else 2)],
            trace_id=f"{i:0>32}" if i % 2 else None,
        )
        for i in range(20)
    ]
    await log.mapped_all(events)
    await log.flush()

    assert len(producer.sent) == len({partition_of(e.event_id) for e in events})
    by_event: dict[str, list[AuditRecord]] = {}
    for r in expand_sent(producer):
        by_event.setdefault(r.event_id, []).append(r)
    assert set(by_event) == {e.event_id for e in events}
    for e in events:
        records = by_event[e.event_id]
        assert len(records) == (3 if e.event_id == "ev-7" else 1)  # 10 commands, 4 an entry
        for r in records:
            assert (r.stage, r.kind, r.outcome, r.command_id) == ("mapper", "event", "mapped", None)
            assert (r.event_type, r.occurred_at, r.trace_id) == (
                e.event_type,
                e.occurred_at,
                e.trace_id,
            )
        assert [ref for r in records for ref in r.commands] == [
            f"{c.region}/{c.kind}/{c.command_id}" for c in e.commands
        ]


class RefusingProducer(SendProducer):
    """Refuses its next `refuse` sends, as a producer whose broker is gone."""

    def __init__(self, refuse: int) -> None:
        super().__init__()
        self.refuse = refuse

    async def send(
        self, topic: str, value: bytes, key: bytes | None, *, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[object]:
        if self.refuse:
            self.refuse -= 1
            raise KafkaTimeoutError()
        return await super().send(topic, value, key, headers=headers)


async def test_records_written_later_keep_when_they_were_handled_and_acked_takes_them_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flush's records may be written during the next flush: they keep the time their
    commands were handled (the latency they report is the sink's, not the wait), and a
    commit's `acked` hands over whatever is still gathered before it waits."""
    producer = SendProducer()
    log = AuditLog(producer, "test.cache.audit", CODEC)  # type: ignore[arg-type]
    clock = [1_764_000_000.0]
    monkeypatch.setattr(audit.time, "time", lambda: clock[0])
    command = purge_command()
    log.handled_all("redis", [(command, Note(), None)])
    assert log.pending == 1
    clock[0] += 5.0

    acked = asyncio.create_task(log.acked())
    await asyncio.sleep(0.01)
    assert log.pending == 0 and len(producer.sent) == 1 and not acked.done()
    producer.acks[0].set_result(None)
    await acked
    (record,) = decode_audits(CODEC, producer.sent[0][2])
    assert record.recorded_at == 1_764_000_000_000


async def test_a_failed_hand_over_of_earlier_records_is_raised_by_acked_not_by_the_caller() -> None:
    """Records of an earlier batch that the producer refuses do not fail the batch that
    happened to write them (its flush is already running): `acked` raises, so that the
    loop reads the earlier batches again instead of committing them unaudited."""
    producer = RefusingProducer(refuse=1)
    log = AuditLog(producer, "test.cache.audit", CODEC)  # type: ignore[arg-type]
    log.handled_all("redis", [(purge_command(), Note(), None)])

    await log.hand_over_earlier()  # refused: kept, not raised

    with pytest.raises(TransientError, match="not handed over"):
        await log.acked()
    await log.acked()  # reported once
    log.handled_all("redis", [(purge_command(), Note(), None)])
    producer.refuse = 1
    with pytest.raises(TransientError, match="not handed over"):
        await log.hand_over()  # the caller's own records: its batch is put back
