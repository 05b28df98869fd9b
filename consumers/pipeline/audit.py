"""Audit records: where each event's cache work went, on the audit topic.

The mapper writes one record per event (the commands it produced); each sink writes
one per command it handled (applied, skipped, fenced, rejected), with provider ids
and, for warms, the edge's cache status. Records are keyed by the origin event id,
so `cachesync trace EVENT_ID` reads a single partition.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from opentelemetry import trace

from cachesync.consumers.commands import Command
from cachesync.consumers.pipeline.sends import BatchedSends
from cachesync.consumers.sinks.base import Note
from cachesync.schemas import Codec


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
            event_id,
            {
                "event_type": event_type,
                "stage": "mapper",
                "command_id": None,
                "region": None,
                "sink": None,
                "kind": "event",
                "outcome": outcome,
                "detail": detail,
                "provider_ids": [],
                "cache_status": {},
                "commands": [f"{c.region}/{c.kind}/{c.command_id}" for c in commands],
                "keys": [],
                "tags": [],
                "urls": [],
                "occurred_at": occurred_at,
            },
        )

    async def handled(self, command: Command, *, sink: str, note: Note) -> None:
        await self._send(
            command.origin_event_id,
            {
                "event_type": command.origin_event_type,
                "stage": "sink",
                "command_id": command.command_id,
                "region": command.region,
                "sink": sink,
                "kind": command.kind,
                "outcome": note.outcome,
                "detail": note.detail[:2000],
                "provider_ids": list(note.provider_ids),
                "cache_status": dict(note.cache_status),
                "commands": [],
                "keys": list(getattr(command, "keys", ())),
                "tags": list(getattr(command, "tags", ())),
                "urls": list(command.urls),
                "occurred_at": command.origin_occurred_at,
            },
        )

    async def _send(self, event_id: str, fields: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        record = {
            "event_id": event_id,
            **fields,
            "recorded_at": now,
            "latency_ms": max(0, now - int(fields["occurred_at"])),
            "trace_id": current_trace_id(),
        }
        value = self.codec.encode("audit", record)
        self._batch.add(self.topic, event_id.encode(), value, [])

    async def flush(self) -> None:
        """Send the records gathered since the last flush and wait for their acks."""
        await self._batch.send()
