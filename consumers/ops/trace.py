"""`cachesync trace EVENT_ID`: where one event's cache work went, read from the audit topic.

Audit records are keyed by event id, so only the key's partition is read: the records
with that key, and the sinks' records about several commands (`headers.AUDIT_BATCH`),
whose key is their first command's event id, for the commands of this event. The view
lists the commands the mapper produced per region and, for each, every sink that
should handle it: its outcome and latency from the event's time, provider ids and
warm cache statuses, or "pending" when no record has arrived (yet).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from rich.tree import Tree

from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.audit import AuditRecord, decode_audits
from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec
from cachesync.consumers.pipeline.kafka import partitions_of
from cachesync.consumers.settings import Settings


@dataclass
class CommandView:
    command_id: str
    region: str
    kind: str
    sinks: dict[str, AuditRecord] = field(default_factory=dict)  # sink -> newest record


@dataclass
class TraceView:
    event_id: str
    event_type: str | None = None
    occurred_at: int | None = None
    mapper: AuditRecord | None = None
    commands: dict[str, CommandView] = field(default_factory=dict)
    trace_ids: set[str] = field(default_factory=set)

    def pending(self, expected: Callable[[str, str], list[str]]) -> list[tuple[str, str, str]]:
        """(region, command, sink) for every expected sink with no record yet."""
        return [
            (c.region, c.command_id, sink)
            for c in self.commands.values()
            for sink in expected(c.region, c.kind)
            if sink not in c.sinks
        ]


async def read_trace(
    settings: Settings, event_id: str, *, since_ms: int | None = None
) -> TraceView:
    """The event's audit records since `since_ms` (default: all the topic holds)."""
    view = TraceView(event_id=event_id)
    key = event_id.encode()
    partition = await _partition_of(settings, key)
    codec = codec_for(settings)
    await start_codec(codec)
    try:
        async with TimeWindow(
            settings, [partition], since_ms=since_ms or 0, client_id="cachesync-trace"
        ) as window:
            async for records in window.batches():
                for record in records:
                    if record.key != key and headers.header(record, headers.AUDIT_BATCH) is None:
                        continue
                    for audit in decode_audits(codec, record.value or b""):
                        if audit.event_id == event_id:
                            _add(view, audit)
    finally:
        await close_codec(codec)
    return view


async def _partition_of(settings: Settings, key: bytes) -> TopicPartition:
    """The audit topic's partition for a key, as the default partitioner chooses it."""
    topic = settings.audit_topic
    partitions = await partitions_of(settings.kafka_bootstrap_servers, [topic])
    numbers = [tp.partition for tp in partitions]
    return TopicPartition(topic, DefaultPartitioner()(key, numbers, numbers))


def _add(view: TraceView, audit: AuditRecord) -> None:
    view.event_type = audit.event_type
    view.occurred_at = audit.occurred_at
    if audit.trace_id:
        view.trace_ids.add(audit.trace_id)
    if audit.stage == "mapper":
        view.mapper = audit
        for ref in audit.commands:
            region, kind, command_id = ref.split("/", 2)
            view.commands.setdefault(command_id, CommandView(command_id, region, kind))
        return
    command_id = audit.command_id or ""
    command = view.commands.setdefault(
        command_id, CommandView(command_id, audit.region or "", audit.kind)
    )
    command.sinks[audit.sink or ""] = audit


def render(view: TraceView, expected: Callable[[str, str], list[str]]) -> Tree:
    if view.event_type is None:
        return Tree(
            f"[red]no audit record for event {view.event_id}[/red] (wrong id, or older than the window)"
        )
    when = dt.datetime.fromtimestamp((view.occurred_at or 0) / 1000, dt.UTC).strftime(
        "%Y-%m-%d %H:%M:%S.%f"
    )[:-3]
    traces = ", ".join(sorted(view.trace_ids)) or "none"
    root = Tree(
        f"[bold]{view.event_type}[/bold] {view.event_id}  at {when} UTC  [dim]trace {traces}[/dim]"
    )
    if view.mapper is None:
        root.add(
            "[yellow]mapper: no record (still pending, or written before auditing began)[/yellow]"
        )
    else:
        m = view.mapper
        kinds = [c.kind for c in view.commands.values()]
        root.add(
            f"mapper: {m.outcome}, {kinds.count('purge')} purge + {kinds.count('warm')} warm commands"
            f"  +{m.latency_ms} ms" + (f"  ({m.detail})" if m.detail else "")
        )
    for region in sorted({c.region for c in view.commands.values()}):
        branch = root.add(f"[bold]{region}[/bold]")
        for command in sorted(
            (c for c in view.commands.values() if c.region == region),
            key=lambda c: (c.kind, c.command_id),
        ):
            node = branch.add(f"{command.kind} {command.command_id[:8]}")
            for sink in sorted(set(expected(region, command.kind)) | set(command.sinks)):
                audit = command.sinks.get(sink)
                if audit is None:
                    node.add(f"{sink:<11}[yellow]pending[/yellow]")
                    continue
                colour = {"applied": "green", "fenced": "cyan", "skipped": "dim"}.get(
                    audit.outcome, "red"
                )
                line = f"{sink:<11}[{colour}]{audit.outcome}[/{colour}]  +{audit.latency_ms} ms"
                if audit.provider_ids:
                    line += f"  ids {', '.join(audit.provider_ids)}"
                if audit.cache_status:
                    statuses = list(audit.cache_status.values())
                    line += f"  edge {statuses.count('HIT')}/{len(statuses)} HIT"
                if audit.detail:
                    line += f"  [dim]{audit.detail}[/dim]"
                node.add(line)
    return root
