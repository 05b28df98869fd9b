"""Audit records: where each event's cache work went, on the audit topic.

The mapper writes one record per event (the commands it produced); each sink writes
one per command it handled (applied, skipped, fenced, rejected), with provider ids
and, for warms, the edge's cache status. Records are keyed by the origin event id,
so `cachesync trace EVENT_ID` reads a single partition.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from aiokafka import AIOKafkaProducer
from opentelemetry import trace

from cachesync.consumers.commands import Command, to_millis
from cachesync.consumers.pipeline.sends import BatchedSends
from cachesync.consumers.sinks.base import Note
from cachesync.schemas import Codec, SerdeError


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """One record of the audit topic; mirrors `schemas/avro/audit/audit.v1.avsc`.

    Times are epoch milliseconds. `stage` is "mapper" (one record per event, with the
    `commands` it produced) or "sink" (one per command a sink handled, with its
    `command_id`, `region`, `sink`, and for purges the `keys`, `tags` and `urls` it named).
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

    def to_record(self) -> dict[str, Any]:
        """The Avro record (arrays as lists, the map as a dict)."""
        record = {name: getattr(self, name) for name in _FIELDS}
        for name in _ARRAYS:
            record[name] = list(record[name])
        record["cache_status"] = dict(self.cache_status)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AuditRecord:
        """From a decoded Avro record (timestamps may come as datetimes)."""
        data = {name: record[name] for name in _FIELDS if name in record}
        for name in _ARRAYS:
            if name in data:
                data[name] = tuple(data[name])
        for name in ("occurred_at", "recorded_at"):
            data[name] = to_millis(data[name])
        return cls(**data)


_FIELDS = tuple(f.name for f in fields(AuditRecord))
_ARRAYS = ("provider_ids", "commands", "keys", "tags", "urls")


def decode_audit(codec: Codec, value: bytes) -> AuditRecord | None:
    """The audit record in a message, or None when the message holds none."""
    try:
        decoded = codec.decode(value)
    except SerdeError:
        return None
    if decoded.type_name != "audit":
        return None
    return AuditRecord.from_record(decoded.record)


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class AuditLog:
    """Produces audit records; `flush` waits for their acks (called before a commit)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, codec: Codec) -> None:
        self.producer = producer
        self.topic = topic
        self.codec = codec
        self._batch = BatchedSends(producer)

    async def mapped(
        self,
        *,
        event_id: str,
        event_type: str,
        occurred_at: int,
        commands: Sequence[Command],
        outcome: str = "mapped",
        detail: str = "",
    ) -> None:
        await self._send(
            AuditRecord(
                event_id=event_id,
                event_type=event_type,
                stage="mapper",
                kind="event",
                outcome=outcome,
                detail=detail,
                commands=tuple(f"{c.region}/{c.kind}/{c.command_id}" for c in commands),
                **_written_now(occurred_at),
            )
        )

    async def handled(self, command: Command, *, sink: str, note: Note) -> None:
        await self._send(
            AuditRecord(
                event_id=command.origin_event_id,
                event_type=command.origin_event_type,
                stage="sink",
                command_id=command.command_id,
                region=command.region,
                sink=sink,
                kind=command.kind,
                outcome=note.outcome,
                detail=note.detail[:2000],
                provider_ids=tuple(note.provider_ids),
                cache_status=dict(note.cache_status),
                keys=tuple(getattr(command, "keys", ())),
                tags=tuple(getattr(command, "tags", ())),
                urls=tuple(command.urls),
                **_written_now(command.origin_occurred_at),
            )
        )

    async def _send(self, record: AuditRecord) -> None:
        value = self.codec.encode("audit", record.to_record())
        self._batch.add(self.topic, record.event_id.encode(), value, [])

    async def flush(self) -> None:
        """Send the records gathered since the last flush and wait for their acks."""
        await self._batch.send()


def _written_now(occurred_at: int) -> dict[str, Any]:
    """The fields a record gets as it is written: its times and the current trace."""
    now = int(time.time() * 1000)
    return {
        "occurred_at": occurred_at,
        "recorded_at": now,
        "latency_ms": max(0, now - int(occurred_at)),
        "trace_id": current_trace_id(),
    }
