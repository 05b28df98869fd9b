"""The running roles: the mapper (events -> command topics) and a sink (command topic -> cache).

Each role is a Kafka batch handler plugged into `CommitAfterEffect`. `Pipeline`
starts any set of them in one process and stops them cleanly on a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

from aiokafka import AIOKafkaProducer
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    Span,
    SpanKind,
    Status,
    StatusCode,
    set_span_in_context,
    use_span,
)
from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.commands import COMMAND_TYPES, Command, to_millis
from cachesync.consumers.errors import (
    BadInput,
    CommandRefused,
    InvalidRecord,
    PermanentSinkError,
    ProduceRefused,
    RetryAfter,
)
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import Mapper
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.audit import AuditLog, MappedEvent
from cachesync.consumers.pipeline.codecs import (
    close_codec,
    codec_for,
    decode,
    decode_event,
    start_codec,
)
from cachesync.consumers.pipeline.dead_letters import DeadLetters
from cachesync.consumers.pipeline.kafka import (
    KafkaConnection,
    Record,
    make_consumer,
    make_producer,
)
from cachesync.consumers.pipeline.loop import CommitAfterEffect
from cachesync.consumers.pipeline.tiers import TierWatch
from cachesync.consumers.pipeline.writer import CommandWriter
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult, Note, Position, Sink
from cachesync.consumers.sinks.cdn import CdnPurgeSink
from cachesync.schemas import Codec, Decoded

log = logging.getLogger(__name__)


@dataclass
class RoleStats:
    """Counters a person watching `run all` wants; metrics carry the same figures."""

    records: int = 0
    produced: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    skipped: int = 0
    dead_lettered: int = 0


class _Role:
    """What every role has: a consumer of its topics on the commit-after-effect loop, and a
    producer for its output, its dead letters and its audit records."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        topics: list[str],
        *,
        group: str,
        codec: Codec | None,
        max_records: int,
        linger_ms: int = 0,
        auto_offset_reset: str = "earliest",
        region: str | None = None,
        producer_linger_ms: int = 5,
        partition_fetch_bytes: int | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        # The cluster it reads and writes: home's, or (a sink) its region's own.
        self.kafka = KafkaConnection.of(settings, region)
        self.codec = codec or codec_for(settings)
        self.stats = RoleStats()
        client_id = f"cachesync-{name}"
        self.producer: AIOKafkaProducer = make_producer(
            self.kafka, client_id=client_id, linger_ms=producer_linger_ms
        )
        self.consumer = make_consumer(
            self.kafka,
            group_id=group,
            client_id=client_id,
            auto_offset_reset=auto_offset_reset,
            **(
                {"max_partition_fetch_bytes": partition_fetch_bytes}
                if partition_fetch_bytes
                else {}
            ),
        )
        self.dead_letters = DeadLetters(self.kafka, settings.dead_letter_topic, name)
        self.audit = AuditLog(self.producer, settings.audit_topic, self.codec)
        self.loop = CommitAfterEffect(
            self.consumer,
            self.handle,
            name=name,
            max_records=max_records,
            linger_ms=linger_ms,
            group=group,
            commit_interval_ms=settings.commit_interval_ms,
        )
        self.consumer.subscribe(topics, listener=self.loop.rebalance_listener())

    async def handle(self, records: list[Record]) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await start_codec(self.codec)
        await self._open()
        await self.producer.start()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()
        await self.dead_letters.close()
        await self._close()
        await close_codec(self.codec)

    async def _open(self) -> None:
        """The role's own connections, opened before it consumes."""

    async def _close(self) -> None:
        """The role's own connections, closed after it stopped consuming and producing."""


@dataclass(slots=True)
class _Mapped:
    """One event of a batch that mapped: where it was, what it yielded, its span."""

    position: int
    record: Record
    item: Decoded
    commands: list[Command]
    span: Span | None  # None when its trace is not sampled
    trace_id: str | None  # its trace's, sampled or not (for its audit entry)


# aiokafka keeps each partition's last fetch until it is consumed and fetches a drained
# partition on its own, so what a consumer holds is bounded by its partitions times this,
# not by fetch_max_bytes. The mapper reads every content topic (18 partitions here): at
# the consumers' 2 MiB, a 100,000-event backlog held some 20 MB of fetched records
# (tracemalloc; peak RSS 97 MB at a 10,000-event backlog, 122-124 at 100,000); at 512 KiB,
# 97 and 116. The drain time did not measurably change: 57-72 s at 2 MiB, 72-74 s at
# 512 KiB, 83 s at 1 MiB (it varies that much between runs of the same code).
MAPPER_PARTITION_FETCH_BYTES = 512 * 1024


class MapperRole(_Role):
    """Consumes content topics, maps events through the rules, produces commands per region."""

    def __init__(self, settings: Settings, *, codec: Codec | None = None) -> None:
        super().__init__(
            settings,
            "mapper",
            settings.content_topics,
            group=settings.group_id("mapper"),
            codec=codec,
            max_records=settings.consumer_max_records,
            partition_fetch_bytes=MAPPER_PARTITION_FETCH_BYTES,
        )
        self._state_redis = Redis.from_url(str(settings.state_redis_url), socket_timeout=5)
        self.mapper = Mapper(
            settings.topology, RelationshipIndex(self._state_redis, settings.topology)
        )

    async def _close(self) -> None:
        await self._state_redis.aclose()

    async def handle(self, records: list[Record]) -> None:
        """Map the batch, send its commands, and only then write the relationship index.

        The index is written last, once every command of the batch is acknowledged (and
        the audit records too): a batch that fails before that is re-read and mapped
        against the index as the first attempt saw it, so the retry yields exactly the
        same commands (a retried `vendor.deleted` still reaches its weddings). Within the
        batch the index view reads its own writes, so a `vendor.linked` is seen by a
        `vendor.updated` after it. If the index write itself fails, the retry sends the
        same commands again under the same ids, which sinks apply at most once in effect.
        """
        # Decode the whole batch first, so that the relationship index is read for all of
        # it in one round trip and written in one (index.flush) instead of per event.
        decoded: list[Decoded | BadInput] = []
        events_in: Counter[str] = Counter()
        for record in records:
            try:
                event = await self._decode(record)
            except BadInput as exc:
                decoded.append(exc)
            else:
                decoded.append(event)
                events_in[event.type_name] += 1
        for event_type, n in events_in.items():
            telemetry.events_in.add(n, {"event_type": event_type})
        index = self.mapper.index.batch()
        with telemetry.untraced():
            await index.prefetch(
                *self.mapper.index_ids(
                    (d.type_name, d.record) for d in decoded if isinstance(d, Decoded)
                )
            )
        writer = CommandWriter(
            self.producer, self.codec, self.settings.commands_topic, renew=self._renew_producer
        )
        mapped: list[_Mapped] = []
        spans: list[Span] = []
        try:
            for position, (record, item) in enumerate(zip(records, decoded, strict=True)):
                self.stats.records += 1
                # Spans follow the platform's sampling decision (parent-based): a sampled
                # event gets one, a child of the platform's; an event without a context
                # starts a trace, sampled as the sampler decides for a root; an unsampled
                # one gets none, and its commands carry the platform's context on as it
                # came, so every later stage makes the same decision for the same trace.
                trace = telemetry.message_trace(record.headers)
                span: Span | None = None
                passed_on: headers.Headers | None = None
                if trace.parent is None:
                    passed_on = telemetry.trace_headers(record.headers)
                else:
                    span = telemetry.tracer.start_span(
                        "cachesync.map",
                        context=trace.parent,
                        kind=SpanKind.CONSUMER,
                        attributes={
                            "messaging.source.name": record.topic,
                            "messaging.kafka.offset": record.offset,
                        },
                    )
                    spans.append(span)
                with use_span(span) if span is not None else nullcontext():
                    try:
                        if isinstance(item, BadInput):
                            raise item
                        index.origin = position
                        commands = await self.mapper.map_event(
                            item.type_name, item.record, index=index
                        )
                    except BadInput as exc:
                        if span is not None:
                            span.set_status(Status(StatusCode.ERROR, exc.reason))
                        await self._dead_letter(record, exc)
                        continue
                    if span is not None:
                        span.set_attributes(
                            {
                                "cachesync.event_type": item.type_name,
                                "cachesync.event_id": str(item.record["event_id"]),
                                "cachesync.commands": len(commands),
                            }
                        )
                    writer.add(commands, origin=position, trace=passed_on)
                    trace_id = telemetry.trace_id_hex(span) if span is not None else trace.trace_id
                    mapped.append(_Mapped(position, record, item, commands, span, trace_id))
            # The audit records of the batch's events, one per audit partition, go out with
            # the commands, in the same produce request: waiting for the commands' acks and
            # then for the records' was two round trips per batch, the second a fifth of a
            # batch's time at 100 events/s. A record may so be written for an event whose
            # commands are not all acked: if they failed, the batch is retried and audited
            # again (readers join an event's mapper records); if the broker refused some,
            # the event is dead-lettered, and a record saying so takes the first one back.
            audited = {
                m.position: MappedEvent(
                    event_id=str(m.item.record["event_id"]),
                    event_type=m.item.type_name,
                    occurred_at=to_millis(m.item.record["occurred_at"]),
                    commands=m.commands,
                    trace_id=m.trace_id,
                )
                for m in mapped
            }
            await self.audit.mapped_all(audited.values())
            refused = await self._send_with(writer, self.audit)
            out: Counter[tuple[str, str]] = Counter()
            for m in mapped:
                if m.position in refused:
                    with use_span(m.span) if m.span is not None else nullcontext():
                        if m.span is not None:
                            m.span.set_status(Status(StatusCode.ERROR, CommandRefused.reason))
                        await self._dead_letter(m.record, CommandRefused(refused[m.position]))
                    continue
                for command in m.commands:
                    out[command.kind, command.region] += 1
            for (kind, region), n in out.items():
                self.stats.produced[region] += n
                telemetry.commands_out.add(n, {"kind": kind, "region": region})
            if refused:
                await self.audit.mapped_all(
                    [
                        replace(audited[p], detail=f"{CommandRefused.reason}: {why}")
                        for p, why in refused.items()
                    ],
                    outcome="dead_lettered",
                )
                await self.audit.flush()
            with telemetry.untraced():
                await index.flush(skip=refused)
        finally:
            for span in spans:
                span.end()

    async def _send_with(self, writer: CommandWriter, audit: AuditLog) -> dict[int, str]:
        """Send the batch's commands and the audit records gathered, and wait for both;
        the events (by position) whose commands the broker will never accept, with why
        (the rest are acked). Handed over in the same turn of the event loop, so that the
        producer's sender takes them into one request."""
        sent, audited = await asyncio.gather(writer.send(), audit.flush(), return_exceptions=True)
        # Only the commands' send reports a refusal as ProduceRefused; any other failure,
        # of either, fails the batch.
        if isinstance(sent, BaseException) and not isinstance(sent, ProduceRefused):
            raise sent
        if isinstance(audited, BaseException):
            raise audited
        return sent.refused if isinstance(sent, ProduceRefused) else {}

    async def _dead_letter(self, record: Record, error: BadInput) -> None:
        await self.dead_letters.send(record, error)
        self.stats.dead_lettered += 1

    async def _renew_producer(self) -> AIOKafkaProducer:
        """Replace the role's producer. After the broker refused one of its batches, the
        idempotent producer's sequence numbers for that partition are out of step, and
        every later send there would fail (aiokafka does not rewind them)."""
        old = self.producer
        self.producer = make_producer(self.kafka, client_id=f"cachesync-{self.name}")
        await self.producer.start()
        # The audit log holds the producer; it has nothing pending while commands are sent.
        self.audit = AuditLog(self.producer, self.settings.audit_topic, self.codec)
        try:
            await old.stop()
        except Exception:  # the old producer has nothing left to deliver
            log.warning("%s: error while stopping the replaced producer", self.name, exc_info=True)
        return self.producer

    async def _decode(self, record: Record) -> Decoded:
        return await decode_event(
            self.codec, record.value or b"", max_bytes=self.settings.max_event_bytes
        )


@dataclass(slots=True)
class _Accepted:
    """One command of a sink's batch: its record, its span if its trace is sampled, and
    its trace id (for its audit record)."""

    record: Record
    command: Command
    span: Span | None
    trace_id: str | None


class SinkRole(_Role):
    """Consumes one region's command topic and applies it through one sink.

    It alone keeps tier order within the region: a batch is held back until the sinks
    this one follows (`sink.after`) have applied its events (see `hold_for_earlier_tiers`).
    """

    # The role's producer carries only its audit records (dead letters have their own):
    # they wait up to this long for the next flushes' records, to go in one request. A
    # flush's records were a request and an ack wait of their own, some 15% of a region's
    # sinks process at 100 events/s.
    AUDIT_LINGER_MS = 50

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        *,
        codec: Codec | None = None,
        auto_offset_reset: str = "earliest",
    ) -> None:
        super().__init__(
            settings,
            f"sink.{sink.region}.{sink.kind}",
            [settings.commands_topic(sink.region)],
            group=settings.group_id("sink", sink.region, sink.kind),
            codec=codec,
            max_records=max(settings.consumer_max_records, sink.max_batch_records or 0),
            linger_ms=sink.linger_ms,
            auto_offset_reset=auto_offset_reset,
            region=sink.region,
            producer_linger_ms=self.AUDIT_LINGER_MS,
        )
        self.sink = sink
        # The audit records of a flush are handed over without waiting for their acks,
        # which the loop awaits before it commits (at most once per commit interval).
        self.loop.before_commit = self.audit.acked
        region_redis = settings.region_redis_urls[sink.region]
        # Tier order: the tiers this sink follows announce what they applied, which wakes
        # its held batch (pipeline/tiers.py); their markers in the region's Redis decide.
        self.tiers = (
            TierWatch(region_redis, sink.region, sink.after, recheck_s=sink.after_retry_s)
            if sink.after
            else None
        )
        # The events a held batch still waits for (empty when none is held).
        self.held_events: set[str] = set()
        if isinstance(sink, CdnPurgeSink):
            # Adaptive coalescing: the loop gathers records only while the provider's budget
            # says to wait (a call in flight, its bucket empty, a burst), within the window.
            self.loop.linger_for = sink.coalesce_for
        elif not sink.after and not sink.linger_ms:
            # A sink that waits for no other tier decodes its next batch while its backend
            # applies this one (a sink after others would mostly decode batches that are
            # put back to wait for them).
            self.loop.read_ahead = self._decode_ahead

    async def _open(self) -> None:
        await self.sink.setup()

    async def _close(self) -> None:
        await self.sink.close()
        if self.tiers is not None:
            await self.tiers.close()

    async def handle(self, records: list[Record]) -> None:
        candidates: list[tuple[Record, Command]] = []
        for record in records:
            try:
                command = await self._decode(record)
            except BadInput as exc:
                await self.dead_letters.send(record, exc)
                self.stats.dead_lettered += 1
                continue
            if not self.sink.accepts(command) or (
                self.sink.is_cdn and headers.header(record, headers.REPLAY_CDN) == b"off"
            ):
                self.stats.skipped += 1
                continue
            candidates.append((record, command))
        await self.hold_for_earlier_tiers([c for _, c in candidates])
        self.stats.records += len(records)
        accepted: dict[str, _Accepted] = {}
        for record, command in candidates:
            # A span per command only in a sampled trace (the platform's decision, which
            # its context carries): the event's trace then shows this sink's apply.
            carried = telemetry.message_trace(record.headers)
            span = None
            trace_id = carried.trace_id
            if carried.parent is not None:
                span = self._command_span(command, carried.parent)
                if span.is_recording():
                    trace_id = telemetry.trace_id_hex(span)
                else:
                    span = None
            accepted[command.command_id] = _Accepted(record, command, span, trace_id)
            # Where it was read: a purge sink records its partition's applied offset with
            # the effect, and skips a re-read record it covers (sinks/ledger.py).
            self.sink.read_from(
                command, Position(record.topic, record.partition, record.offset, record.timestamp)
            )
            self.sink.add(command)
        if not accepted:
            return
        spans = [a.span for a in accepted.values() if a.span is not None]
        # The backend calls of a flush serve every command in it: the flush span is a
        # child of the first sampled command's span and links to all of them (with none
        # sampled, it is a root, sampled as such).
        try:
            with telemetry.tracer.start_as_current_span(
                f"cachesync.flush {self.sink.kind}",
                context=set_span_in_context(spans[0]) if spans else None,
                links=[Link(s.get_span_context()) for s in spans],
                attributes={
                    "cachesync.region": self.sink.region,
                    "cachesync.batch": len(accepted),
                    "cachesync.sampled": len(spans),
                },
            ):
                result = await self._flush()
        except BaseException as exc:
            for span in spans:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.end()
            raise
        self.stats.applied += result.applied
        rejected = {r.command.command_id: r.error for r in result.rejected}
        applied = Note()
        handled: list[tuple[Command, Note, str | None]] = []
        for command_id, a in accepted.items():
            if command_id in rejected:
                note = Note(outcome="rejected", detail=rejected[command_id])
                await self.dead_letters.send(a.record, PermanentSinkError(rejected[command_id]))
                self.stats.dead_lettered += 1
            else:
                note = result.notes.get(command_id, applied)
            if a.span is not None:
                a.span.set_attribute("cachesync.outcome", note.outcome)
                if note.provider_ids:
                    a.span.set_attribute("cachesync.provider_ids", list(note.provider_ids))
                if command_id in rejected:
                    a.span.set_status(Status(StatusCode.ERROR, "rejected"))
                a.span.end()
            handled.append((a.command, note, a.trace_id))
        # Every command's outcome, in one record per outcome and audit partition (audit.py):
        # written now, or, when the next batch is already read, while its flush runs.
        self.audit.handled_all(self.sink.kind, handled)
        if not self.loop.has_read_ahead():
            await self.audit.hand_over()

    async def _flush(self) -> FlushResult:
        """The sink's flush; the audit records of the batch before, if still unwritten,
        are written while it runs (the Redis sink waits a fifth of its time for its
        script, and writing a batch's records is a sixth of its CPU)."""
        if not self.audit.pending:
            return await self.sink.flush()
        flushing = asyncio.ensure_future(self.sink.flush())
        try:
            await self.audit.hand_over_earlier()
            return await flushing
        finally:
            if not flushing.done():
                flushing.cancel()

    def _command_span(self, command: Command, parent: Context) -> Span:
        """The command's own span, in the trace of the event that caused it."""
        return telemetry.tracer.start_span(
            f"cachesync.apply {self.sink.kind}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "cachesync.region": self.sink.region,
                "cachesync.sink": self.sink.kind,
                "cachesync.command_id": command.command_id,
                "cachesync.kind": command.kind,
                "cachesync.event_id": command.origin_event_id,
            },
        )

    # The longest a batch waits inside the handler for the earlier tiers; then it is put
    # back and read again at once, so that a stop or a rebalance is never kept waiting.
    HOLD_SLICE_S = 2.0

    async def hold_for_earlier_tiers(self, commands: list[Command]) -> None:
        """Tier order: wait until the sinks this one follows (`sink.after`) have applied the
        batch's events in this region, woken by their announcements (pipeline/tiers.py).

        A command still waiting `sink.after_max_wait_s` after it was issued no longer holds
        the batch: the sink gets it through `sink.overdue` (a purge sink applies it anyway,
        the warmer drops it), so a stopped tier cannot stop those after it for longer than
        that bound. The batch waits here at most HOLD_SLICE_S at a time; if an event still
        within its bound is not applied by then, the batch is put back (RetryAfter) and
        read again at once.
        """
        if self.tiers is None or not commands:
            return
        bound_ms = self.sink.after_max_wait_s * 1000
        # Per event, until when it may hold the batch: its latest command's issue + bound.
        due: dict[str, float] = {}
        for command in commands:
            event = command.origin_event_id
            due[event] = max(due.get(event, 0.0), command.issued_at + bound_ms)
        left_s = (max(due.values()) - time.time() * 1000) / 1000
        self.held_events = set(due)
        waiting = await self.tiers.wait(due, timeout_s=min(self.HOLD_SLICE_S, max(left_s, 0.0)))
        self.held_events = waiting
        if not waiting:
            return
        now_ms = time.time() * 1000
        if any(due[event] > now_ms for event in waiting):
            raise RetryAfter(
                f"{self.name}: {len(waiting)} events not yet applied by {', '.join(self.sink.after)}",
                0.0,
            )
        self.held_events = set()
        log.warning(
            "%s: handing over %d events that %s has not applied after %.0fs",
            self.name,
            len(waiting),
            "/".join(self.sink.after),
            self.sink.after_max_wait_s,
        )
        for command in commands:
            if command.origin_event_id in waiting:
                self.sink.overdue(command)

    def _decode_ahead(self, records: list[Record]) -> None:
        """Decode a batch read ahead into the process's command cache, where `_decode` finds
        it; what does not decode is left to `_decode` to dead-letter."""
        for record in records:
            value = record.value or b""
            if _COMMANDS.get(value) is None:
                with contextlib.suppress(BadInput):
                    _command_of(value, self.codec.decode(value))

    async def _decode(self, record: Record) -> Command:
        value = record.value or b""
        if (known := _COMMANDS.get(value)) is not None:
            return known
        return _command_of(value, await decode(self.codec, value))


Role = MapperRole | SinkRole


class CommandCache:
    """Commands by the bytes of their message, shared by the sink roles of a process.

    A region's sinks (Redis, the CDNs, the warmer) each read the same command topic, and
    each decoded every record itself: some 16% of a region's sinks process in the tier
    benchmark. A command is immutable (a frozen dataclass) and its message's bytes say
    all of it, its schema included, so the first sink to read a message decodes it and
    the others take the same command. The oldest entries go first, past `size`: the
    sinks of a region read within a few batches of each other.
    """

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        # An OrderedDict, not a dict: a dict finds its oldest entry by scanning past the
        # slots its earlier deletions left at its start (`next(iter(d))`), 5.7 us per put
        # once full, against 0.5 us for `popitem(last=False)`: a tenth of the Redis sink's
        # CPU in its benchmark's profile.
        self._by_value: OrderedDict[bytes, Command] = OrderedDict()

    def get(self, value: bytes) -> Command | None:
        return self._by_value.get(value)

    def put(self, value: bytes, command: Command) -> None:
        if len(self._by_value) >= self.size:
            self._by_value.popitem(last=False)
        self._by_value[value] = command


_COMMANDS = CommandCache()


def _command_of(value: bytes, decoded: Decoded) -> Command:
    """The command a decoded message holds, remembered by its bytes; BadInput if none."""
    model = COMMAND_TYPES.get(decoded.type_name)
    if model is None:
        raise BadInput(f"{decoded.type_name!r} is not a command")
    try:
        command: Command = model.from_record(decoded.record)
    except ValueError as exc:
        raise InvalidRecord(f"{decoded.type_name}: {exc}") from exc
    _COMMANDS.put(value, command)
    return command


async def run_roles(roles: list[Role], stop: asyncio.Event) -> None:
    """Start every role, run until `stop`, then finish in-flight batches and close.

    Stopping is cooperative: each loop finishes (and commits) the batch in hand before
    it returns, so Ctrl-C never cancels a write half-way.
    """
    started: list[Role] = []
    try:
        for role in roles:
            await role.start()
            started.append(role)
        tasks = [asyncio.create_task(r.loop.run(stop), name=r.name) for r in roles]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise task.exception()  # type: ignore[misc]
    finally:
        for role in reversed(started):
            try:
                await role.stop()
            except Exception:  # closing must go on for the others
                log.exception("%s: error while stopping", role.name)
