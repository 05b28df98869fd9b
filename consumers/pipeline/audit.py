"""Audit records: where each event's cache work went, on the audit topic.

The mapper says what each event became (the commands it produced), in one record per
batch rather than one per event. Each sink says what became of every command it handled
(applied, skipped, fenced, rejected), with provider ids and, for warms, the edge's cache
status, in one record per flush and outcome rather than one per command. A record about
one event or command carries it in its own fields (as `audit.v1` did), a record about
several lists them in `handled`. Readers see one `AuditRecord` per event (mapper) or
command (sink) either way (`decode_audits`, `AuditRecord.expand`).

Records are keyed by the origin event id, so `cachesync trace EVENT_ID` reads a single
partition: a batch's events and a flush's commands are grouped by the partition their
event id hashes to, and a record about several is keyed by its first event id (the
others share its partition) and marked with the `headers.AUDIT_BATCH` header, so that
`trace` decodes it although its key names another event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry import trace

from cachesync.consumers.commands import Command, to_millis
from cachesync.consumers.errors import TransientError
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.sends import BatchedSends, ack_error
from cachesync.consumers.sinks.base import Note
from cachesync.consumers.telemetry import trace_id_hex
from cachesync.schemas import Codec, SerdeError

# What one record about several commands may hold: at most this many, in at most this
# many bytes, so that it stays well below the topic's message size (1 MB by default; a
# command is itself at most one Kafka message, so a record about it alone may be larger).
ENTRIES_PER_RECORD = 500
RECORD_BYTES = 512 * 1024
# A note's detail is cut to this many characters.
DETAIL_CHARS = 2000


@dataclass(frozen=True, slots=True, kw_only=True)
class HandledCommand:
    """One event (stage mapper) or command (stage sink) of a record about several; mirrors
    `HandledCommand` in `schemas/avro/audit/audit.v3.avsc` (times in epoch milliseconds)."""

    command_id: str
    event_id: str
    event_type: str
    occurred_at: int
    detail: str = ""
    provider_ids: tuple[str, ...] = ()
    cache_status: Mapping[str, str] = field(default_factory=dict)
    keys: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()  # stage mapper: what the event produced (its command_id "")
    trace_id: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "occurred_at": self.occurred_at,
            "detail": self.detail,
            "provider_ids": list(self.provider_ids),
            "cache_status": dict(self.cache_status),
            "keys": list(self.keys),
            "tags": list(self.tags),
            "urls": list(self.urls),
            "commands": list(self.commands),
            "trace_id": self.trace_id,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> HandledCommand:
        return cls(
            command_id=record["command_id"],
            event_id=record["event_id"],
            event_type=record["event_type"],
            occurred_at=to_millis(record["occurred_at"]),
            detail=record.get("detail", ""),
            provider_ids=tuple(record.get("provider_ids", ())),
            cache_status=dict(record.get("cache_status", {})),
            keys=tuple(record.get("keys", ())),
            tags=tuple(record.get("tags", ())),
            urls=tuple(record.get("urls", ())),
            commands=tuple(record.get("commands", ())),
            trace_id=record.get("trace_id"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """One record of the audit topic; mirrors `schemas/avro/audit/audit.v3.avsc`.

    Times are epoch milliseconds. `stage` is "mapper" (about an event, with the `commands`
    it produced) or "sink" (about one command a sink handled, with its `command_id`,
    `region`, `sink`, and for purges the `keys`, `tags` and `urls` it named). With
    `handled`, a record is about several: a mapper batch's events, or one flush's commands
    with one outcome; `expand` gives one record per event or command.
    """

    event_id: str
    event_type: str
    stage: str
    command_id: str | None = None
    region: str | None = None
    sink: str | None = None
    kind: str
    outcome: str
    detail: str = ""
    provider_ids: tuple[str, ...] = ()
    cache_status: Mapping[str, str] = field(default_factory=dict)
    commands: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    occurred_at: int
    recorded_at: int
    latency_ms: int = 0
    trace_id: str | None = None
    handled: tuple[HandledCommand, ...] = ()

    def to_record(self) -> dict[str, Any]:
        """The Avro record (arrays as lists, the map as a dict)."""
        record = {name: getattr(self, name) for name in _FIELDS}
        for name in _ARRAYS:
            record[name] = list(record[name])
        record["cache_status"] = dict(self.cache_status)
        record["handled"] = [h.to_record() for h in self.handled]
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AuditRecord:
        """From a decoded Avro record (timestamps may come as datetimes; a v1 record has
        no `handled`)."""
        data = {name: record[name] for name in _FIELDS if name in record}
        for name in _ARRAYS:
            if name in data:
                data[name] = tuple(data[name])
        for name in ("occurred_at", "recorded_at"):
            data[name] = to_millis(data[name])
        data["handled"] = tuple(HandledCommand.from_record(h) for h in record.get("handled", ()))
        return cls(**data)

    def expand(self) -> list[AuditRecord]:
        """One record per command this record is about (itself, when about one)."""
        if not self.handled:
            return [self]
        return [
            replace(
                self,
                event_id=h.event_id,
                event_type=h.event_type,
                command_id=h.command_id or None,
                commands=h.commands,
                detail=h.detail,
                provider_ids=h.provider_ids,
                cache_status=h.cache_status,
                keys=h.keys,
                tags=h.tags,
                urls=h.urls,
                occurred_at=h.occurred_at,
                latency_ms=max(0, self.recorded_at - h.occurred_at),
                trace_id=h.trace_id,
                handled=(),
            )
            for h in self.handled
        ]


_FIELDS = tuple(f.name for f in fields(AuditRecord) if f.name != "handled")
_ARRAYS = ("provider_ids", "commands", "keys", "tags", "urls")
# Every field of an entry at its default: what the mapper's entries start from.
_EMPTY_ENTRY = HandledCommand(command_id="", event_id="", event_type="", occurred_at=0).to_record()
# An event's commands per entry of a mapper record: some 50 bytes each, so that a fan-out to
# 50,000 weddings does not make a record too large for the audit topic (`trace` joins them).
COMMANDS_PER_ENTRY = 2_000


@dataclass(frozen=True, slots=True)
class MappedEvent:
    """What the mapper made of one event, for its audit entry; `detail` says why, for an
    event dead-lettered after it was audited as mapped."""

    event_id: str
    event_type: str
    occurred_at: int
    commands: Sequence[Command]
    trace_id: str | None
    detail: str = ""


def decode_audit(codec: Codec, value: bytes) -> AuditRecord | None:
    """The audit record in a message as written (maybe about several commands), or None
    when the message holds none."""
    try:
        decoded = codec.decode(value)
    except SerdeError:
        return None
    if decoded.type_name != "audit":
        return None
    return AuditRecord.from_record(decoded.record)


def decode_audits(codec: Codec, value: bytes) -> list[AuditRecord]:
    """The audit records in a message, one per command (or the mapper's one per event);
    empty when the message holds none."""
    record = decode_audit(codec, value)
    return [] if record is None else record.expand()


def current_trace_id() -> str | None:
    span = trace.get_current_span()
    return trace_id_hex(span) if span.get_span_context().is_valid else None


# A sink's record about one command, gathered until it is written: the command, the sink,
# what it said, the command's trace id, when it was handled (epoch ms).
_Handled = tuple[Command, str, Note, str | None, int]


class AuditLog:
    """Produces audit records. `flush` writes the records gathered since the last one and
    waits for every record's ack; a sink uses `hand_over` per flush and `acked` before
    its loop commits, so that one request carries the records of many flushes."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, codec: Codec) -> None:
        self.producer = producer
        self.topic = topic
        self.codec = codec
        self._batch = BatchedSends(producer)
        self._handled: list[_Handled] = []
        self._in_flight: list[asyncio.Future[object]] = []
        # Handing over and taking what was handed over for `acked` go one at a time: a
        # commit must not miss records another task is still writing.
        self._handing = asyncio.Lock()
        # Why records of batches already handled were not handed over, for `acked`.
        self._lost: TransientError | None = None

    async def mapped_all(self, events: Iterable[MappedEvent], *, outcome: str = "mapped") -> None:
        """What a batch's events became, written at the next `flush`: one record per audit
        partition of their event ids (of at most ENTRIES_PER_RECORD events and RECORD_BYTES;
        an event's commands in entries of at most COMMANDS_PER_ENTRY), not one per event:
        encoding and producing a record per event was a tenth of the mapper's work.

        `outcome` "dead_lettered" takes back what an earlier "mapped" record of the same
        events said (readers keep the newest mapper record of an event: one event's
        records share a partition, so they are read in the order written)."""
        partitions = await self._partitions()
        partition_of = self._batch.partitioner
        groups: dict[int, list[dict[str, Any]]] = {}
        for e in events:
            where = partition_of(e.event_id.encode(), partitions, partitions)
            refs = [f"{c.region}/{c.kind}/{c.command_id}" for c in e.commands]
            for start in range(0, max(len(refs), 1), COMMANDS_PER_ENTRY):
                groups.setdefault(where, []).append(
                    {
                        **_EMPTY_ENTRY,
                        "event_id": e.event_id,
                        "event_type": e.event_type,
                        "occurred_at": e.occurred_at,
                        "commands": refs[start : start + COMMANDS_PER_ENTRY],
                        "trace_id": e.trace_id,
                        "detail": e.detail[:DETAIL_CHARS],
                    }
                )
        now = int(time.time() * 1000)
        shared = {
            "stage": "mapper",
            "command_id": None,
            "region": None,
            "sink": None,
            "kind": "event",
            "outcome": outcome,
            "recorded_at": now,
        }
        for entries in groups.values():
            self._write_records(shared, entries)

    async def _partitions(self) -> list[int]:
        """The audit topic's partitions, which records are grouped by."""
        return sorted(await self.producer.partitions_for(self.topic))

    async def handled(
        self, command: Command, *, sink: str, note: Note, trace_id: str | None = None
    ) -> None:
        """What `sink` did with `command`, written at the next `flush` with the others of
        the same outcome. `trace_id`: the command's trace (default: the current span's)."""
        if trace_id is None:
            trace_id = current_trace_id()
        self.handled_all(sink, [(command, note, trace_id)])

    def handled_all(self, sink: str, handled: Iterable[tuple[Command, Note, str | None]]) -> None:
        """What `sink` did with each of a flush's commands (its note, its trace id or None),
        written at the next `flush` or hand-over: `handled` for many at once, without an
        await each. Their records are stamped now, however late they are written."""
        at = int(time.time() * 1000)
        self._handled += [(c, sink, note, trace_id, at) for c, note, trace_id in handled]

    @property
    def pending(self) -> int:
        """Commands handled whose records are not written yet."""
        return len(self._handled)

    async def flush(self) -> None:
        """Write the sinks' records gathered since the last flush, then send every record
        and wait for the acks."""
        handled, self._handled = self._handled, []
        if handled:
            await self._write_handled(handled)
        await self._batch.send()

    async def hand_over(self) -> None:
        """Write the records gathered since the last call and hand them to the producer,
        without waiting for their acks: `acked` does, before the offsets of the batches
        they are about are committed. Each goes through `producer.send`, so the records
        of the flushes within the producer's linger travel in one request. TransientError
        if the producer refused them: the caller's batch is put back."""
        await self._hand_over(earlier=False)

    async def hand_over_earlier(self) -> None:
        """`hand_over`, for records of batches already handled (a sink writes them while
        its next flush runs): a failure is kept for `acked`, which makes the loop read
        those batches again, since the caller's own batch is not the one they are about."""
        await self._hand_over(earlier=True)

    async def _hand_over(self, *, earlier: bool) -> None:
        async with self._handing:
            handled, self._handled = self._handled, []
            try:
                if handled:
                    await self._write_handled(handled)
                for topic, key, value, hdrs in self._batch.take():
                    self._in_flight.append(
                        await self.producer.send(topic, value, key, headers=hdrs)
                    )
            except KafkaError as exc:
                error = TransientError(f"audit records not handed over: {type(exc).__name__}")
                if not earlier:
                    raise error from exc
                self._lost = self._lost or error

    async def acked(self) -> None:
        """Hand over what is still gathered, then wait until every record handed over so
        far is acknowledged; TransientError if one was not, or was not handed over (the
        batches it is about must then be read and audited again)."""
        await self.hand_over()
        async with self._handing:
            in_flight, self._in_flight = self._in_flight, []
            lost, self._lost = self._lost, None
        if lost is not None:
            raise lost
        if not in_flight:
            return
        await asyncio.wait(in_flight)
        for future in in_flight:
            if (error := ack_error(future, "audit record")) is not None:
                raise TransientError(
                    f"audit records not acknowledged: {type(error).__name__}: {error}"
                ) from error

    async def _write_handled(self, handled: list[_Handled]) -> None:
        """One record per (region, sink, kind, outcome, partition of the event id), of at
        most ENTRIES_PER_RECORD commands and RECORD_BYTES (a command alone may be more)."""
        partitions = await self._partitions()
        partition_of = self._batch.partitioner
        groups: dict[tuple[str, str, str, str, int], list[dict[str, Any]]] = {}
        # A record's time: when the last of its commands was handled (they are written
        # once per flush, at most a flush later).
        handled_at: dict[tuple[str, str, str, str, int], int] = {}
        for command, sink, note, trace_id, at in handled:
            where = partition_of(command.origin_event_id.encode(), partitions, partitions)
            group: tuple[str, str, str, str, int] = (
                command.region,
                sink,
                command.kind,
                note.outcome,
                where,
            )
            groups.setdefault(group, []).append(_entry(command, note, trace_id))
            handled_at[group] = max(at, handled_at.get(group, at))
        for group, entries in groups.items():
            region, sink, kind, outcome, _ = group
            now = handled_at[group]
            shared = {
                "stage": "sink",
                "region": region,
                "sink": sink,
                "kind": kind,
                "outcome": outcome,
                "commands": [],
                "recorded_at": now,
            }
            self._write_records(shared, entries)

    def _write_records(self, shared: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        """Records about `entries`, each about at most ENTRIES_PER_RECORD of them."""
        for start in range(0, len(entries), ENTRIES_PER_RECORD):
            self._write_entries(shared, entries[start : start + ENTRIES_PER_RECORD])

    def _write_entries(self, shared: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        """One record about `entries` (in halves while it is over RECORD_BYTES)."""
        first = entries[0]
        # About one command, its own fields say it all (as a v1 record did); about several,
        # they name the first, and `handled` lists them all.
        record = {
            **first,
            **shared,
            "latency_ms": max(0, shared["recorded_at"] - first["occurred_at"]),
            "handled": entries if len(entries) > 1 else [],
        }
        value = self.codec.encode("audit", record)
        if len(value) > RECORD_BYTES and len(entries) > 1:
            half = len(entries) // 2
            self._write_entries(shared, entries[:half])
            self._write_entries(shared, entries[half:])
            return
        hdrs = [(headers.AUDIT_BATCH, b"1")] if len(entries) > 1 else []
        self._batch.add(self.topic, first["event_id"].encode(), value, hdrs)


def _entry(command: Command, note: Note, trace_id: str | None) -> dict[str, Any]:
    """The Avro record of one handled command (`HandledCommand`)."""
    return {
        "command_id": command.command_id,
        "event_id": command.origin_event_id,
        "event_type": command.origin_event_type,
        "occurred_at": command.origin_occurred_at,
        "detail": note.detail[:DETAIL_CHARS],
        "provider_ids": list(note.provider_ids),
        "cache_status": note.cache_status,
        "keys": list(getattr(command, "keys", ())),
        "tags": list(getattr(command, "tags", ())),
        "urls": list(command.urls),
        "trace_id": trace_id,
    }
