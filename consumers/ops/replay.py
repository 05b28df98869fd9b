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

from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from cachesync.consumers.commands import Command, PurgeCommand
from cachesync.consumers.errors import BadInput
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import Mapper
from cachesync.consumers.pipeline.codecs import close_codec, codec_for, decode_event, start_codec
from cachesync.consumers.pipeline.kafka import make_producer, partitions_of
from cachesync.consumers.pipeline.writer import CommandWriter
from cachesync.consumers.settings import Settings
from cachesync.schemas import Codec


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
    wanted_regions = set(regions) if regions else set(settings.topology.regions)
    unknown = wanted_regions - set(settings.topology.regions)
    if unknown:
        raise ValueError(f"unknown regions {sorted(unknown)}")
    codec = codec_for(settings)
    state = Redis.from_url(str(settings.state_redis_url))
    index_cls = _ReadOnlyIndex if dry_run else RelationshipIndex
    mapper = Mapper(settings.topology, index_cls(state, settings.topology))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        client_id=f"cachesync-replay-{report.replay_id}",
        max_partition_fetch_bytes=2 * 1024 * 1024,
    )
    produce = not (dry_run or index_only)
    producer = (
        make_producer(settings.kafka_bootstrap_servers, client_id="cachesync-replay")
        if produce
        else None
    )
    started = time.monotonic()
    await start_codec(codec)
    await consumer.start()
    writer = (
        CommandWriter(
            producer,
            codec,
            settings.commands_topic,
            replay_id=report.replay_id,
            cdn=cdn,
        )
        if producer is not None
        else None
    )
    if producer is not None:
        await producer.start()
    try:
        partitions = await partitions_of(settings.kafka_bootstrap_servers, settings.content_topics)
        starts, ends = await _range(consumer, partitions, since_ms, until_ms)
        todo = {tp for tp in partitions if starts[tp] < ends[tp]}
        total = sum(ends[tp] - starts[tp] for tp in todo)
        consumer.assign(sorted(todo, key=lambda tp: (tp.topic, tp.partition)))
        for tp in todo:
            consumer.seek(tp, starts[tp])
        if progress:
            progress(0, total)
        while todo:
            batch = await consumer.getmany(timeout_ms=500, max_records=batch_size)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    report.records += 1
                    for command in await _map(
                        codec,
                        mapper,
                        record.value or b"",
                        report,
                        index_only,
                        settings.max_event_bytes,
                    ):
                        if command.region not in wanted_regions:
                            continue
                        report.commands[(command.region, command.kind)] += 1
                        if isinstance(command, PurgeCommand):
                            report.cdn_items[command.region] += (
                                len(command.urls) + len(command.tags) + len(command.prefixes)
                            )
                        if writer is not None:
                            writer.add([command])
                if records and records[-1].offset + 1 >= ends[tp]:
                    todo.discard(tp)
            if writer is not None:
                await writer.send()
            if progress:
                progress(report.records, total)
    finally:
        report.seconds = time.monotonic() - started
        await consumer.stop()
        if producer is not None:
            await producer.stop()
        await state.aclose()
        await close_codec(codec)
    return report


async def _range(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    since_ms: int,
    until_ms: int | None,
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Start and end offsets per partition for the time window (end exclusive)."""
    end_now: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    found = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
    starts = {tp: (found[tp].offset if found.get(tp) else end_now[tp]) for tp in partitions}
    if until_ms is None:
        return starts, end_now
    found_end = await consumer.offsets_for_times({tp: until_ms for tp in partitions})
    ends = {tp: (found_end[tp].offset if found_end.get(tp) else end_now[tp]) for tp in partitions}
    return starts, ends


async def _map(
    codec: Codec,
    mapper: Mapper,
    value: bytes,
    report: ReplayReport,
    index_only: bool,
    max_bytes: int,
) -> list[Command]:
    """Decode and map one event; bad input is counted (the live mapper already dead-lettered it)."""
    try:
        decoded = await decode_event(codec, value, max_bytes=max_bytes)
        report.events[decoded.type_name] += 1
        if index_only:
            await mapper.update_index(decoded.type_name, decoded.record)
            return []
        return await mapper.map_event(
            decoded.type_name, decoded.record, replay=True, replay_id=report.replay_id
        )
    except BadInput as exc:
        report.skipped_bad[exc.reason] += 1
        return []
