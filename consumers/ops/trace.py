"""`cachesync trace`: where one event's cache work went, and which events touched an entity.

`trace EVENT_ID` reads the audit topic for one event.

Audit records are keyed by event id, so only the key's partition is read: the records
with that key, and the sinks' records about several commands (`headers.AUDIT_BATCH`),
whose key is their first command's event id, for the commands of this event. The view
lists the commands the mapper produced per region and, for each, every sink that
should handle it: its outcome and latency from the event's time, provider ids and
warm cache statuses, or "pending" when no record has arrived (yet). An event that a
consumer gave up on has no audit record but a dead letter: the trace says so, with the
reason and error of its `dlq.*` headers and the dead letter's id (`cachesync dlq show`).

`trace --wedding W` (or `--vendor V`) lists the events about that entity since a time
(`find_events`): read from the content topics themselves (an event's `wedding_id` or
`vendor_id` field), each with its id, type, time and outcome, which the audit topic and
the dead-letter topic of the same window give. Their ids are what `trace EVENT_ID` takes.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from rich.tree import Tree

from cachesync.consumers.errors import BadInput
from cachesync.consumers.ops.dlq import DeadLetter, read_dead_letters
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.audit import AuditRecord, decode_audits
from cachesync.consumers.pipeline.codecs import close_codec, codec_for, decode, start_codec
from cachesync.consumers.pipeline.kafka import KafkaConnection, partitions_of
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.registry import PURGE_KINDS, WARM_KINDS, available
from cachesync.schemas import Codec

# Which sinks should report on a command of a kind ("purge", "warm") in a region.
Expected = Callable[[str, str], list[str]]


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
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.event_type is not None

    def pending(self, expected: Callable[[str, str], list[str]]) -> list[tuple[str, str, str]]:
        """(region, command, sink) for every expected sink with no record yet."""
        return [
            (c.region, c.command_id, sink)
            for c in self.commands.values()
            for sink in expected(c.region, c.kind)
            if sink not in c.sinks
        ]


def expected_sinks(settings: Settings) -> Expected:
    """Which sinks should report on a command of a kind in a region: the ones configured."""

    def expected(region: str, kind: str) -> list[str]:
        return available(settings, region, WARM_KINDS if kind == "warm" else PURGE_KINDS)

    return expected


async def read_trace(
    settings: Settings, event_id: str, *, since_ms: int | None = None
) -> TraceView:
    """The event's audit records and dead letters since `since_ms` (default: all the
    topics hold)."""
    view = TraceView(event_id=event_id)
    for letter in await read_dead_letters(settings, since_ms=since_ms):
        if letter.event_id == event_id:
            view.dead_letters.append(letter)
            view.event_type = view.event_type or letter.event_type
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
    partitions = await partitions_of(KafkaConnection.of(settings), [topic])
    numbers = [tp.partition for tp in partitions]
    return TopicPartition(topic, DefaultPartitioner()(key, numbers, numbers))


def _add(view: TraceView, audit: AuditRecord) -> None:
    view.event_type = audit.event_type
    view.occurred_at = audit.occurred_at
    if audit.trace_id:
        view.trace_ids.add(audit.trace_id)
    if audit.stage == "mapper" and audit.outcome != "mapped":
        # Dead-lettered after it was audited as mapped (a command the broker refused):
        # what the mapper record said is taken back, and the dead letter says why.
        view.mapper = None
        view.commands = {i: c for i, c in view.commands.items() if c.sinks}
        return
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


def render(view: TraceView, expected: Expected) -> Tree:
    if not view.found:
        return Tree(
            f"[red]no audit record and no dead letter for event {view.event_id}[/red] (wrong "
            "id, older than the window, or not consumed yet: `trace --wedding W` lists ids)"
        )
    occurred = view.occurred_at or next(
        (d.timestamp for d in view.dead_letters if d.timestamp is not None), 0
    )
    traces = ", ".join(sorted(view.trace_ids)) or "none"
    root = Tree(
        f"[bold]{view.event_type}[/bold] {view.event_id}  at {_when(occurred)} UTC  "
        f"[dim]trace {traces}[/dim]"
    )
    for letter in view.dead_letters:
        redriven = (
            f"; re-driven {_when(letter.redriven.at)} UTC"
            if letter.redriven is not None
            else f"; after a fix: cachesync dlq redrive --id {letter.id}"
        )
        root.add(
            f"[red]dead-lettered[/red] by {letter.consumer or '?'} at "
            f"{_when(letter.dead_lettered_at)} UTC: [bold]{letter.reason}[/bold]: "
            f"{letter.error}  [dim](cachesync dlq show {letter.id}{redriven})[/dim]"
        )
    if view.mapper is None and not view.dead_letters:
        root.add(
            "[yellow]mapper: no record (still pending, or written before auditing began)[/yellow]"
        )
    elif view.mapper is not None:
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


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


# -- which events touched an entity --------------------------------------------------
@dataclass
class EventSummary:
    """One event about the entity searched for, and what became of it."""

    event_id: str
    event_type: str
    occurred_at: int
    origin: str  # topic[partition]@offset
    mapper: AuditRecord | None = None
    commands: Counter[str] = field(default_factory=Counter)  # kind -> commands produced
    reports: Counter[str] = field(default_factory=Counter)  # outcome -> sink reports
    expected_reports: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """In a few words: dead-lettered and why, not mapped yet, or mapped and how far."""
        if self.dead_letters and self.mapper is None:
            letter = self.dead_letters[-1]
            redriven = ", re-driven" if letter.redriven is not None else ""
            return f"dead-lettered ({letter.reason}{redriven}): {letter.error}"
        if self.mapper is None:
            return "not mapped (yet, or no rule for this event type)"
        made = " + ".join(f"{n} {kind}" for kind, n in sorted(self.commands.items())) or "no"
        done = sum(self.reports.values())
        parts = [f"{'re-driven and ' if self.dead_letters else ''}mapped: {made} commands"]
        if self.expected_reports:
            parts.append(f"{min(done, self.expected_reports)}/{self.expected_reports} sink steps")
        failed = {o: n for o, n in self.reports.items() if o not in _FINE}
        if failed:
            parts.append(", ".join(f"{n} {o}" for o, n in sorted(failed.items())))
        return ", ".join(parts)


# Sink outcomes that are not a problem.
_FINE = frozenset({"applied", "skipped", "fenced", "duplicate", "dropped"})


async def find_events(
    settings: Settings,
    *,
    wedding: str | None = None,
    vendor: str | None = None,
    since_ms: int,
    limit: int = 20,
) -> list[EventSummary]:
    """The newest `limit` events since `since_ms` whose wedding_id is `wedding` or whose
    vendor_id is `vendor` (either matches when both are given), oldest first, each with
    its outcome from the audit and dead-letter topics."""
    wanted = {
        name: value
        for name, value in (("wedding_id", wedding), ("vendor_id", vendor))
        if value is not None
    }
    if not wanted:
        raise ValueError("name the entity: --wedding W or --vendor V")
    codec = codec_for(settings)
    await start_codec(codec)
    try:
        found = await _matching_events(settings, codec, wanted, since_ms)
        found = found[-limit:] if limit > 0 else found
        by_id = {e.event_id: e for e in found}
        await _add_audits(settings, codec, by_id, since_ms)
    finally:
        await close_codec(codec)
    for letter in await read_dead_letters(settings, since_ms=since_ms):
        if letter.event_id in by_id:
            by_id[letter.event_id].dead_letters.append(letter)
    expected = expected_sinks(settings)
    for event in found:
        if event.mapper is not None:
            event.expected_reports = sum(
                len(expected(region, kind))
                for ref in event.mapper.commands
                for region, kind in [ref.split("/", 2)[:2]]
            )
    return found


async def _matching_events(
    settings: Settings, codec: Codec, wanted: dict[str, str], since_ms: int
) -> list[EventSummary]:
    """The content topics' events since `since_ms` with a wanted field value, by time."""
    # By event time, then by place: events of one entity share a partition, so equal
    # times keep their publication order (numerically: offset 10 after offset 9).
    found: list[tuple[tuple[int, str, int, int], EventSummary]] = []
    async with TimeWindow(
        settings, settings.content_topics, since_ms=since_ms, client_id="cachesync-trace"
    ) as window:
        async for records in window.batches():
            for record in records:
                try:
                    decoded = await decode(codec, record.value or b"")
                except BadInput:
                    continue  # the dead-letter topic holds it, with why
                fields = decoded.record
                if not any(fields.get(name) == value for name, value in wanted.items()):
                    continue
                occurred_at = _millis(fields.get("occurred_at"), record.timestamp)
                summary = EventSummary(
                    event_id=str(fields.get("event_id")),
                    event_type=decoded.type_name,
                    occurred_at=occurred_at,
                    origin=f"{record.topic}[{record.partition}]@{record.offset}",
                )
                found.append(
                    ((occurred_at, record.topic, record.partition, record.offset), summary)
                )
    found.sort(key=lambda item: item[0])
    return [summary for _, summary in found]


async def _add_audits(
    settings: Settings, codec: Codec, events: dict[str, EventSummary], since_ms: int
) -> None:
    """The mapper's and the sinks' audit records of `events`, from the audit topic."""
    if not events:
        return
    async with TimeWindow(
        settings, [settings.audit_topic], since_ms=since_ms, client_id="cachesync-trace"
    ) as window:
        async for records in window.batches():
            for record in records:
                for audit in decode_audits(codec, record.value or b""):
                    event = events.get(audit.event_id)
                    if event is None:
                        continue
                    if audit.stage == "mapper" and audit.outcome != "mapped":
                        event.mapper, event.commands = None, Counter()  # as in `_add`
                    elif audit.stage == "mapper":
                        if event.mapper is None:
                            event.mapper = audit
                        else:  # a fan-out's commands span several records
                            event.mapper = _joined(event.mapper, audit)
                        event.commands = Counter(
                            ref.split("/", 2)[1] for ref in event.mapper.commands
                        )
                    else:
                        event.reports[audit.outcome] += 1


def _joined(first: AuditRecord, more: AuditRecord) -> AuditRecord:
    """One mapper record from two (a large fan-out's, or a redelivered event's)."""
    return replace(first, commands=tuple(dict.fromkeys((*first.commands, *more.commands))))


def _millis(value: object, fallback: int) -> int:
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, int):
        return value
    return fallback
