"""`cachesync dlq list | show | redrive`: the dead-letter topic, read and re-driven after a fix.

Each dead letter is named by its place on the dead-letter topic, `<partition>:<offset>`
(`0:17`): stable for as long as the topic keeps the record (its retention), and what
`show` and `redrive --id` take back. The `dlq.*` headers (`pipeline/headers.py`) say
why (reason, error), where from (topic, partition, offset, the record's own time) and
which consumer gave up; the payload is decoded, where it decodes, for the event's type
and id (a command's origin event, for a sink's dead letter).

A re-drive sends the dead letter's value and key, with its own headers (the `dlq.*`
ones dropped), back to its original topic (`dlq.topic`), plus `cachesync.redrive: <id>`.
The consumer that gave up on it then meets it as new input: a re-driven event is mapped
and audited again like any event, so `cachesync trace EVENT_ID` shows it; a re-driven
command reaches every sink of its region again, and those that applied it before skip
it by its command id (for as long as their applied markers last).

Each chosen dead letter is checked first; one that fails a check is reported with why
and not sent:
- `topic missing`: its original topic no longer exists (nothing would consume it, and a
  broker that auto-creates topics would make a wrong one);
- `would fail`: it would be dead-lettered again. An event is decoded, checked and mapped
  with this release's schemas and rules through a batch view of the relationship index
  that is never flushed, so nothing is written; a command is decoded. What only a
  provider can refuse (a sink's 4xx) cannot be checked here: such a command is sent;
- `truncated`: too large for the dead-letter topic, it was kept as its origin and its
  value's first 64 KiB (`dlq.truncated`): sending a prefix would only fail again, or
  worse, decode into something else. Always refused, `force` or not: re-publish the
  original from its source (the origin the listing gives, while its topic retains it);
- `already re-driven`: refused unless `force`.

Which dead letters were re-driven is remembered in the state Redis, one hash per
dead-letter topic (`keys.DLQ_REDRIVEN`): field the id, value its dead-letter time, when
it was re-driven and where the copy went. A hash rather than marker records on a topic:
checking is one HMGET and claiming one HSETNX, atomic when two operators re-drive at
once, where a marker topic would be read whole on every run and offers no claim. A
dead letter is claimed before it is sent and released if the send fails, so a crash in
between leaves it marked (`--force` re-drives it), never sent twice unmarked. An entry
whose dead-letter time differs from the record's belongs to an earlier topic of the same
name and is ignored; entries older than the topic's retention are pruned on each
re-drive, so the hash holds at most the re-drives of the last retention period. Losing
the state Redis loses this memory (not the re-drives: each copy carries its header).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from rich.markup import escape
from rich.table import Table

from cachesync.consumers import keys
from cachesync.consumers.commands import COMMAND_TYPES
from cachesync.consumers.errors import BadInput, redis_errors
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import Mapper
from cachesync.consumers.ops.clients import ToolClients
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.codecs import (
    decode,
    decode_event,
)
from cachesync.consumers.pipeline.kafka import KafkaConnection, Record, make_admin
from cachesync.consumers.settings import Settings
from cachesync.schemas import Codec

# Every header the dead-letter topic adds starts with this (pipeline/headers.py).
DLQ_HEADER_PREFIX = "dlq."

# Outcomes of a re-drive, per dead letter.
SENT = "sent"
WOULD_SEND = "would send"  # a dry run
ALREADY = "already re-driven"
MISSING_TOPIC = "topic missing"
WOULD_FAIL = "would fail"
TRUNCATED = "truncated"

_ID = re.compile(r"(\d+):(\d+)")


def parse_id(value: str) -> str:
    """A dead letter's id in its one spelling ("0:017" is "0:17"); ValueError if it is none."""
    match = _ID.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a dead letter id (<partition>:<offset>, as listed)")
    return f"{int(match[1])}:{int(match[2])}"


@dataclass(frozen=True, slots=True)
class Redriven:
    """When a dead letter was re-driven, and where the copy went ("topic[p]@offset";
    empty while the re-drive is claimed but not yet acknowledged)."""

    at: int
    sent_to: str


@dataclass(kw_only=True)
class DeadLetter:
    """One record of the dead-letter topic and what its `dlq.*` headers say about it."""

    id: str  # "<partition>:<offset>" on the dead-letter topic
    dead_lettered_at: int  # epoch ms, the dead-letter record's own time
    reason: str
    error: str
    consumer: str  # the role that gave up on it: "mapper", "sink.eu-west.cloudflare"
    topic: str  # where it came from, where a re-drive sends it
    partition: int | None
    offset: int | None
    timestamp: int | None  # the original record's time, epoch ms
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]  # the record's own, without the dlq.* ones
    # Too large to dead-letter whole: `value` is only the original's first bytes.
    truncated: bool = False
    original_bytes: int | None = None
    # From the payload, when it decodes: "event", "purge" or "warm", and the event.
    kind: str | None = None
    event_type: str | None = None
    event_id: str | None = None
    record: dict[str, Any] | None = None
    redriven: Redriven | None = None

    @property
    def origin(self) -> str:
        partition = "?" if self.partition is None else self.partition
        offset = "?" if self.offset is None else self.offset
        return f"{self.topic}[{partition}]@{offset}"

    @classmethod
    def from_record(cls, record: Record) -> DeadLetter:
        dlq = {k: bytes(v) for k, v in record.headers or () if k.startswith(DLQ_HEADER_PREFIX)}

        def text(name: str) -> str:
            return dlq.get(name, b"").decode(errors="replace")

        def number(name: str) -> int | None:
            try:
                return int(text(name))
            except ValueError:
                return None

        return cls(
            id=f"{record.partition}:{record.offset}",
            dead_lettered_at=record.timestamp,
            reason=text(headers.DLQ_REASON) or "unknown",
            error=text(headers.DLQ_ERROR),
            consumer=text(headers.DLQ_CONSUMER),
            topic=text(headers.DLQ_TOPIC),
            partition=number(headers.DLQ_PARTITION),
            offset=number(headers.DLQ_OFFSET),
            timestamp=number(headers.DLQ_TIMESTAMP),
            key=record.key,
            value=record.value,
            truncated=text(headers.DLQ_TRUNCATED) == "true",
            original_bytes=number(headers.DLQ_ORIGINAL_BYTES),
            headers=tuple(
                (k, bytes(v))
                for k, v in record.headers or ()
                if not k.startswith(DLQ_HEADER_PREFIX)
            ),
        )

    def redrive_headers(self) -> list[tuple[str, bytes]]:
        """The headers of the re-sent record: its own (trace context included), without a
        previous re-drive's mark, plus this re-drive's."""
        own = [(k, v) for k, v in self.headers if k != headers.REDRIVE]
        return [*own, (headers.REDRIVE, self.id.encode())]


@dataclass
class RedriveOutcome:
    letter: DeadLetter
    outcome: str  # SENT, WOULD_SEND, ALREADY, MISSING_TOPIC, WOULD_FAIL or TRUNCATED
    detail: str = ""

    @property
    def sent(self) -> bool:
        return self.outcome in (SENT, WOULD_SEND)


@dataclass
class RedriveReport:
    dry_run: bool
    outcomes: list[RedriveOutcome] = field(default_factory=list)
    unknown_ids: list[str] = field(default_factory=list)  # asked for, not among those chosen

    @property
    def sent(self) -> list[RedriveOutcome]:
        return [o for o in self.outcomes if o.sent]

    @property
    def not_sent(self) -> list[RedriveOutcome]:
        return [o for o in self.outcomes if not o.sent]


async def read_dead_letters(
    settings: Settings,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    reasons: Collection[str] = (),
    ids: Collection[str] = (),
) -> list[DeadLetter]:
    """The dead letters written between two times (default: all the topic holds), of the
    given reasons and ids (default: any), in topic order, described and with their
    re-drive status."""
    async with _DeadLetterTopic(settings) as dlq:
        return await dlq.read(since_ms=since_ms, until_ms=until_ms, reasons=reasons, ids=ids)


async def find_dead_letter(settings: Settings, dead_letter_id: str) -> DeadLetter | None:
    """One dead letter by its id, or None when the topic does not hold it."""
    found = await read_dead_letters(settings, ids=[dead_letter_id])
    return found[0] if found else None


async def redrive(
    settings: Settings,
    *,
    reasons: Collection[str] = (),
    ids: Collection[str] = (),
    since_ms: int | None = None,
    until_ms: int | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> RedriveReport:
    """Re-send the chosen dead letters to their original topics; see the module docstring.

    The filters combine (a reason and a time range and ids); at least one must be given,
    so that nothing re-drives the whole topic by accident.
    """
    if not reasons and not ids and since_ms is None:
        raise ValueError("choose the dead letters to re-drive: by reason, time (since) or id")
    report = RedriveReport(dry_run=dry_run)
    async with _DeadLetterTopic(settings, produce=not dry_run) as dlq:
        letters = await dlq.read(since_ms=since_ms, until_ms=until_ms, reasons=reasons, ids=ids)
        found = {letter.id for letter in letters}
        report.unknown_ids = sorted({parse_id(i) for i in ids} - found)
        existing = await _existing_topics(settings)
        for letter in letters:
            report.outcomes.append(
                await dlq.redrive(letter, existing, dry_run=dry_run, force=force)
            )
        if not dry_run:
            await dlq.ledger.prune()
    return report


class _DeadLetterTopic(ToolClients):
    """What reading and re-driving share: the codec, the state Redis (the re-drive ledger,
    the relationship index for the check) and, to re-drive, a producer."""

    def __init__(self, settings: Settings, *, produce: bool = False) -> None:
        super().__init__(settings, client_id="cachesync-dlq-redrive", produce=produce)
        self.ledger = RedriveLedger(
            self.state,
            settings.dead_letter_topic,
            retention_ms=settings.topology.topics.dead_letter.retention_ms,
        )
        self.check = _Check(settings, self.codec, self.state)

    async def read(
        self,
        *,
        since_ms: int | None,
        until_ms: int | None,
        reasons: Collection[str],
        ids: Collection[str],
    ) -> list[DeadLetter]:
        wanted = {parse_id(i) for i in ids}
        letters: list[DeadLetter] = []
        async with TimeWindow(
            self.settings,
            [self.settings.dead_letter_topic],
            since_ms=since_ms or 0,
            until_ms=until_ms,
            client_id="cachesync-dlq",
        ) as window:
            # Read to the end even when looking for ids: dead letters are few, and the
            # window reads only the partitions that hold records in it.
            async for records in window.batches():
                for record in records:
                    if wanted and f"{record.partition}:{record.offset}" not in wanted:
                        continue
                    letter = DeadLetter.from_record(record)
                    if not reasons or letter.reason in reasons:
                        letters.append(letter)
        for letter in letters:
            await self._describe(letter)
        await self.ledger.lookup(letters)
        return letters

    async def _describe(self, letter: DeadLetter) -> None:
        """The payload's kind, event type and id, where it decodes."""
        try:
            decoded = await decode(self.codec, letter.value or b"")
        except BadInput:
            return
        record = decoded.record
        # Shown to people: its times as times.
        letter.record = self.settings.catalog.latest(decoded.type_name).with_datetimes(record)
        if decoded.type_name in COMMAND_TYPES:
            letter.kind = decoded.type_name
            letter.event_type = _str_or_none(record.get("origin_event_type"))
            letter.event_id = _str_or_none(record.get("origin_event_id"))
        else:
            letter.kind = "event"
            letter.event_type = decoded.type_name
            letter.event_id = _str_or_none(record.get("event_id"))

    async def redrive(
        self, letter: DeadLetter, existing: set[str], *, dry_run: bool, force: bool
    ) -> RedriveOutcome:
        """One dead letter checked and, unless a check fails or this is a dry run, sent."""
        if letter.truncated:
            size = "?" if letter.original_bytes is None else f"{letter.original_bytes:,}"
            return RedriveOutcome(
                letter,
                TRUNCATED,
                f"only the first {len(letter.value or b''):,} of {size} bytes were kept:"
                f" re-publish the original from {letter.origin}",
            )
        if letter.topic not in existing:
            return RedriveOutcome(letter, MISSING_TOPIC, f"no topic {letter.topic!r}")
        failure = await self.check.failure(letter)
        if failure is not None:
            return RedriveOutcome(letter, WOULD_FAIL, failure)
        previous = letter.redriven
        if previous is not None and not force:
            return RedriveOutcome(letter, ALREADY, _redriven_text(previous) + " (--force)")
        if dry_run:
            return RedriveOutcome(letter, WOULD_SEND, f"to {letter.topic}")
        if not await self.ledger.claim(letter, force=force):
            return RedriveOutcome(letter, ALREADY, "by another re-drive just now (--force)")
        assert self.producer is not None
        try:
            sent = await (
                await self.producer.send(
                    letter.topic,
                    value=letter.value,
                    key=letter.key,
                    headers=letter.redrive_headers(),
                )
            )
        except BaseException:
            await self.ledger.release(letter, previous)
            raise
        sent_to = f"{sent.topic}[{sent.partition}]@{sent.offset}"
        letter.redriven = await self.ledger.record(letter, sent_to)
        return RedriveOutcome(letter, SENT, f"to {sent_to}")


class _Check:
    """Would a dead letter be dead-lettered again? Decoded (and an event mapped) as its
    consumer would, writing nothing."""

    def __init__(self, settings: Settings, codec: Codec, state: Redis) -> None:
        self.codec = codec
        self.max_event_bytes = settings.max_event_bytes
        self.mapper = Mapper(settings.topology, RelationshipIndex(state, settings.topology))
        self.content_topics = set(settings.content_topics)
        self.command_topics = {settings.commands_topic(r) for r in settings.topology.regions}

    async def failure(self, letter: DeadLetter) -> str | None:
        """Why it would be dead-lettered again ("reason: error"), or None if it would not."""
        value = letter.value or b""
        try:
            if letter.topic in self.content_topics:
                decoded = await decode_event(self.codec, value, max_bytes=self.max_event_bytes)
                # A batch view is written only by its flush, which never comes.
                view = self.mapper.index.batch()
                await self.mapper.map_event(decoded.type_name, decoded.record, index=view)
            elif letter.topic in self.command_topics:
                decoded = await decode(self.codec, value)
                model = COMMAND_TYPES.get(decoded.type_name)
                if model is None:
                    return f"{BadInput.reason}: {decoded.type_name!r} is not a command"
                model.from_record(decoded.record)
        except BadInput as exc:
            return f"{exc.reason}: {exc}"
        except ValueError as exc:  # a command's model refused the record
            return f"invalid_record: {exc}"
        return None


class RedriveLedger:
    """Which dead letters were re-driven: one hash in the state Redis (see the module docstring)."""

    def __init__(self, redis: Redis, dead_letter_topic: str, *, retention_ms: int | None) -> None:
        self.redis = redis
        self.key = keys.dlq_redriven(dead_letter_topic)
        self.retention_ms = retention_ms

    async def lookup(self, letters: list[DeadLetter]) -> None:
        """Set each letter's `redriven` from the ledger."""
        if not letters:
            return
        async with redis_errors("state redis: read the re-drive ledger"):
            values = await self.redis.hmget(self.key, [letter.id for letter in letters])
        for letter, value in zip(letters, values, strict=True):
            letter.redriven = _entry_of(letter, value)

    async def claim(self, letter: DeadLetter, *, force: bool) -> bool:
        """Mark `letter` as being re-driven; False if it already is (unless `force`)."""
        value = _entry(letter, sent_to="")
        async with redis_errors("state redis: claim a re-drive"):
            if force:
                await self.redis.hset(self.key, letter.id, value)
                return True
            if await self.redis.hsetnx(self.key, letter.id, value):
                return True
            if _entry_of(letter, await self.redis.hget(self.key, letter.id)) is not None:
                return False
            # The entry of an earlier topic's record at the same place: not this one's.
            await self.redis.hset(self.key, letter.id, value)
            return True

    async def record(self, letter: DeadLetter, sent_to: str) -> Redriven:
        value = _entry(letter, sent_to=sent_to)
        async with redis_errors("state redis: record a re-drive"):
            await self.redis.hset(self.key, letter.id, value)
        redriven = _entry_of(letter, value)
        assert redriven is not None
        return redriven

    async def release(self, letter: DeadLetter, previous: Redriven | None) -> None:
        """Undo a claim whose send failed: back to the previous re-drive, or to none."""
        async with redis_errors("state redis: release a re-drive"):
            if previous is None:
                await self.redis.hdel(self.key, letter.id)
            else:
                entry = {
                    "dead_lettered_at": letter.dead_lettered_at,
                    "at": previous.at,
                    "sent_to": previous.sent_to,
                }
                await self.redis.hset(self.key, letter.id, json.dumps(entry))

    async def prune(self, now_ms: int | None = None) -> int:
        """Drop the entries of dead letters older than the topic's retention; how many."""
        if self.retention_ms is None:  # the topic keeps its records: so does the ledger
            return 0
        horizon = (now_ms if now_ms is not None else _now_ms()) - self.retention_ms
        async with redis_errors("state redis: prune the re-drive ledger"):
            entries = await self.redis.hgetall(self.key)
            expired = [
                name for name, value in entries.items() if _dead_lettered_at(value) < horizon
            ]
            if expired:
                await self.redis.hdel(self.key, *expired)
        return len(expired)


def _entry(letter: DeadLetter, *, sent_to: str) -> str:
    return json.dumps(
        {"dead_lettered_at": letter.dead_lettered_at, "at": _now_ms(), "sent_to": sent_to}
    )


def _entry_of(letter: DeadLetter, value: bytes | str | None) -> Redriven | None:
    """The ledger's entry for `letter`, or None (no entry, or one for another record)."""
    if value is None:
        return None
    try:
        data = json.loads(value)
        if data["dead_lettered_at"] != letter.dead_lettered_at:
            return None
        return Redriven(at=int(data["at"]), sent_to=str(data["sent_to"]))
    except (ValueError, KeyError, TypeError):
        return None


def _dead_lettered_at(value: bytes | str) -> int:
    try:
        return int(json.loads(value)["dead_lettered_at"])
    except (ValueError, KeyError, TypeError):
        return 0  # unreadable: prune it


async def _existing_topics(settings: Settings) -> set[str]:
    # Listing every topic never creates one, where asking for a named topic's metadata may.
    admin = make_admin(KafkaConnection.of(settings), client_id="cachesync-dlq")
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _when(ms: int | None) -> str:
    if ms is None:
        return "?"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _redriven_text(redriven: Redriven) -> str:
    where = f" to {redriven.sent_to}" if redriven.sent_to else " (claimed, not acknowledged)"
    return f"re-driven {_when(redriven.at)}{where}"


def _event_text(letter: DeadLetter) -> str:
    if letter.kind is None:
        return "[dim]does not decode[/dim]"
    kind = "" if letter.kind == "event" else f"{letter.kind} of "
    return escape(f"{kind}{letter.event_type or '?'} {letter.event_id or '?'}")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def list_table(letters: list[DeadLetter]) -> Table:
    """One row of two lines per dead letter: what `cachesync dlq list` prints."""
    table = Table(title=f"{len(letters)} dead letter{'' if len(letters) == 1 else 's'}")
    # What names a dead letter and its origin never wraps; the event and the error fold.
    table.add_column("id", no_wrap=True)
    table.add_column("dead-lettered (UTC)\nreason", no_wrap=True)
    table.add_column("origin\nconsumer", no_wrap=True)
    table.add_column("event\nerror", overflow="fold")
    table.add_column("re-driven\n(UTC)", no_wrap=True)
    for letter in letters:
        table.add_row(
            letter.id,
            f"{_when(letter.dead_lettered_at)}\n[red]{escape(letter.reason)}[/red]",
            escape(f"{letter.origin}\n{letter.consumer}"),
            f"{_event_text(letter)}\n[dim]{escape(_short(letter.error, 160))}[/dim]",
            "-" if letter.redriven is None else _when(letter.redriven.at).replace(" ", "\n"),
        )
    return table


def detail_table(letter: DeadLetter) -> Table:
    """One dead letter in full: what `cachesync dlq show ID` prints."""
    table = Table(show_header=False, title=f"dead letter {letter.id}", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("reason", f"[red]{escape(letter.reason)}[/red]")
    table.add_row("error", escape(letter.error))
    table.add_row("consumer", escape(letter.consumer))
    table.add_row("origin", escape(letter.origin))
    table.add_row("original time", f"{_when(letter.timestamp)} UTC")
    table.add_row("dead-lettered", f"{_when(letter.dead_lettered_at)} UTC")
    table.add_row("event", _event_text(letter))
    table.add_row("key", escape(repr(letter.key)))
    table.add_row(
        "headers",
        escape("\n".join(f"{k}: {v.decode(errors='replace')}" for k, v in letter.headers)) or "-",
    )
    size = len(letter.value or b"")
    if letter.record is not None:
        payload = json.dumps(letter.record, indent=2, default=str, ensure_ascii=False)
        table.add_row("payload", f"{size} bytes, decoded:\n{escape(payload)}")
    else:
        table.add_row("payload", f"{size} bytes: {escape(_short(repr(letter.value), 200))}")
    redriven = "no" if letter.redriven is None else _redriven_text(letter.redriven)
    table.add_row("re-driven", escape(redriven))
    return table


def redrive_table(report: RedriveReport) -> Table:
    """One row per chosen dead letter and what the re-drive did with it."""
    colours = {SENT: "green", WOULD_SEND: "cyan"}
    table = Table(title="re-drive (dry run)" if report.dry_run else "re-drive")
    table.add_column("id", no_wrap=True)
    table.add_column("reason\norigin", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("event\ndetail", overflow="fold")
    for o in report.outcomes:
        colour = colours.get(o.outcome, "red")
        table.add_row(
            o.letter.id,
            escape(f"{o.letter.reason}\n{o.letter.origin}"),
            f"[{colour}]{o.outcome}[/{colour}]",
            f"{_event_text(o.letter)}\n[dim]{escape(_short(o.detail, 160))}[/dim]",
        )
    for unknown in report.unknown_ids:
        table.add_row(unknown, "", "[red]not found[/red]", "no such dead letter among those chosen")
    return table
