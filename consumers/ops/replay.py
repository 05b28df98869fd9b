"""Replaying content topics to rebuild cache state.

`replay` re-reads the content topics from the offsets for a start time up to the
offsets for an end time (or the ends as they were when the replay began, so it
always terminates), maps every event again with today's rules and produces the
commands marked as replay, with ids of their own so sinks do not take them for
duplicates of the originals. It reads with no consumer group: the live mapper's
offsets are untouched.

- `dry_run` maps without producing or touching the relationship index, and reports
  the plan: events by type, commands by region and kind, CDN items they would purge.
- `index_only` rebuilds the vendor<->wedding and wedding->regions index and
  produces nothing (after a loss of the state Redis).
- `cdn=False` marks replayed commands so CDN sinks skip them (header
  `cachesync.replay-cdn: off`): a Redis rebuild need not purge the CDNs again.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cachesync.consumers.commands import Command, PurgeCommand
from cachesync.consumers.errors import BadInput
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import Mapper
from cachesync.consumers.ops.clients import ToolClients
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline.codecs import decode_event
from cachesync.consumers.pipeline.kafka import Record
from cachesync.consumers.pipeline.writer import CommandWriter
from cachesync.consumers.settings import Settings


@dataclass
class ReplayReport:
    replay_id: str
    dry_run: bool
    index_only: bool
    events: Counter[str] = field(default_factory=Counter)
    skipped_bad: Counter[str] = field(default_factory=Counter)
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)  # (region, kind)
    cdn_items: Counter[str] = field(default_factory=Counter)  # region -> urls+tags+prefixes
    records: int = 0
    seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


class _ReadOnlyIndex(RelationshipIndex):
    """Reads the live index, never writes it: what a dry run needs."""

    async def link_vendor(self, vendor_id: str, wedding_id: str) -> None:
        return None

    async def unlink_vendor(self, vendor_id: str, wedding_id: str) -> None:
        return None

    async def forget_vendor(self, vendor_id: str) -> None:
        return None

    async def set_wedding_regions(self, wedding_id: str, countries: Any) -> list[str]:
        return self.regions_for_countries(countries)


async def replay(
    settings: Settings,
    *,
    since_ms: int,
    until_ms: int | None = None,
    regions: set[str] | None = None,
    dry_run: bool = False,
    index_only: bool = False,
    cdn: bool = True,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 500,
) -> ReplayReport:
    """Re-map the content topics between two times; see the module docstring."""
    report = ReplayReport(replay_id=uuid.uuid4().hex[:12], dry_run=dry_run, index_only=index_only)
    wanted = _wanted_regions(settings, regions)
    started = time.monotonic()
    try:
        async with (
            _Replayer(settings, report, wanted, cdn=cdn) as replayer,
            TimeWindow(
                settings,
                settings.content_topics,
                since_ms=since_ms,
                until_ms=until_ms,
                client_id=f"cachesync-replay-{report.replay_id}",
                max_records=batch_size,
            ) as window,
        ):
            if progress:
                progress(0, window.total)
            async for records in window.batches():
                await replayer.replay(records)
                if progress:
                    progress(report.records, window.total)
    finally:
        report.seconds = time.monotonic() - started
    return report


def _wanted_regions(settings: Settings, regions: set[str] | None) -> set[str]:
    """The regions to produce for (all by default); ValueError for one the topology lacks."""
    wanted = set(regions) if regions else set(settings.topology.regions)
    unknown = wanted - set(settings.topology.regions)
    if unknown:
        raise ValueError(f"unknown regions {sorted(unknown)}")
    return wanted


class _Replayer(ToolClients):
    """Maps events again, counts their commands in the report and writes them.

    A dry run reads the index without writing it; a dry run and an index rebuild
    produce nothing (no producer, no writer).
    """

    def __init__(
        self, settings: Settings, report: ReplayReport, regions: set[str], *, cdn: bool
    ) -> None:
        super().__init__(
            settings,
            client_id="cachesync-replay",
            produce=not (report.dry_run or report.index_only),
        )
        self.report = report
        self.regions = regions
        index_cls = _ReadOnlyIndex if report.dry_run else RelationshipIndex
        self.mapper = Mapper(settings.topology, index_cls(self.state, settings.topology))
        self.writer = (
            CommandWriter(
                self.producer,
                self.codec,
                settings.commands_topic,
                replay_id=report.replay_id,
                cdn=cdn,
            )
            if self.producer is not None
            else None
        )

    async def replay(self, records: list[Record]) -> None:
        """One batch: each event mapped, its commands for the wanted regions counted and sent."""
        for record in records:
            self.report.records += 1
            commands = [c for c in await self._map(record.value or b"") if c.region in self.regions]
            self._count(commands)
            if self.writer is not None and commands:
                self.writer.add(commands)
        if self.writer is not None:
            await self.writer.send()

    async def _map(self, value: bytes) -> list[Command]:
        """Decode and map one event; bad input is counted (the live mapper already dead-lettered it)."""
        try:
            decoded = await decode_event(self.codec, value, max_bytes=self.settings.max_event_bytes)
            self.report.events[decoded.type_name] += 1
            if self.report.index_only:
                await self.mapper.update_index(decoded.type_name, decoded.record)
                return []
            return await self.mapper.map_event(
                decoded.type_name, decoded.record, replay=True, replay_id=self.report.replay_id
            )
        except BadInput as exc:
            self.report.skipped_bad[exc.reason] += 1
            return []

    def _count(self, commands: list[Command]) -> None:
        for command in commands:
            self.report.commands[(command.region, command.kind)] += 1
            if isinstance(command, PurgeCommand):
                self.report.cdn_items[command.region] += (
                    len(command.urls) + len(command.tags) + len(command.prefixes)
                )
