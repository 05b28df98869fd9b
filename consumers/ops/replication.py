"""How far each region's own cluster is behind home: MirrorMaker 2's replication lag, read
from the two clusters themselves (`cachesync status` shows it).

For a region whose sinks read a cluster of their own (`KAFKA_BOOTSTRAP_SERVERS_<REGION>`),
per partition of its command topic: the newest record the region's copy holds, then at
home the records after it. MirrorMaker 2 keeps a record's partition and its timestamp
(and, with IdentityReplicationPolicy, its topic's name), so the home records newer than
the region's newest are those not mirrored yet: their count is the lag in records, the
age of the oldest of them the lag in time. Nothing is read from MirrorMaker 2 itself, so
the figure holds whatever runs the mirror, and reads 0 only when the region really has
every record. (Records stamped in the same millisecond as the region's newest count as
mirrored: the lag can be short by those few.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from rich.table import Table

from cachesync.consumers.pipeline.kafka import (
    KafkaConnection,
    make_consumer,
    partitions_of,
    regional_clusters,
)
from cachesync.consumers.settings import Settings


@dataclass(frozen=True)
class ReplicationLag:
    """One region's command topic on its own cluster, against home's."""

    region: str
    topic: str
    cluster: str  # the region's brokers
    records: int | None  # home records not in the region yet; None: not readable
    seconds: float | None  # age of the oldest of them; 0.0 when none
    error: str | None = None  # why it could not be read (the region's cluster is down)


async def replication_lag(settings: Settings, *, timeout_s: float = 5.0) -> list[ReplicationLag]:
    """Each region with a cluster of its own: how far its command topic is behind home's."""
    home = KafkaConnection.of(settings)
    out: list[ReplicationLag] = []
    for region, kafka in regional_clusters(settings).items():
        topic = settings.commands_topic(region)
        try:
            records, seconds = await asyncio.wait_for(copy_lag(home, kafka, topic), timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else type(exc).__name__
            out.append(ReplicationLag(region, topic, kafka.bootstrap_servers, None, None, why))
        else:
            out.append(ReplicationLag(region, topic, kafka.bootstrap_servers, records, seconds))
    return out


async def copy_lag(
    source: KafkaConnection, copy: KafkaConnection, topic: str, copy_topic: str | None = None
) -> tuple[int, float]:
    """How far `copy_topic` (default: the same name) on the `copy` cluster is behind `topic`
    on `source`: (records not copied yet, age in seconds of the oldest of them)."""
    async with (
        _reader(source, "cachesync-replication-source") as at_source,
        _reader(copy, "cachesync-replication-copy") as at_copy,
    ):
        partitions = await partitions_of(source, [topic])
        source_end = await at_source.end_offsets(partitions)
        copied = {tp.partition for tp in await partitions_of(copy, [copy_topic or topic])}
        newest = await _newest_timestamps(
            at_copy, [TopicPartition(copy_topic or topic, n) for n in sorted(copied)]
        )
        # Per partition, the first source record newer than the copy's newest (from the
        # start when the copy has none of the partition yet).
        found = await at_source.offsets_for_times(
            {tp: newest.get(tp.partition, -1) + 1 for tp in partitions}
        )
    records, oldest = 0, None
    for tp in partitions:
        first = found.get(tp)
        if first is None or source_end[tp] <= first.offset:
            continue
        records += source_end[tp] - first.offset
        oldest = first.timestamp if oldest is None else min(oldest, first.timestamp)
    seconds = 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)
    return records, seconds


@asynccontextmanager
async def _reader(kafka: KafkaConnection, client_id: str) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = make_consumer(kafka, group_id=None, client_id=client_id)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _newest_timestamps(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
) -> dict[int, int]:
    """Partition -> the timestamp of its last record (partitions with none are left out)."""
    if not partitions:
        return {}
    ends = await consumer.end_offsets(partitions)
    starts = await consumer.beginning_offsets(partitions)
    wanted = [tp for tp in partitions if ends[tp] > starts[tp]]
    consumer.assign(wanted)
    for tp in wanted:
        consumer.seek(tp, ends[tp] - 1)
    newest: dict[int, int] = {}
    while len(newest) < len(wanted):
        for tp, records in (await consumer.getmany(timeout_ms=500)).items():
            if records:
                newest[tp.partition] = max(r.timestamp for r in records)
                consumer.pause(tp)
    return newest


def replication_table(lags: list[ReplicationLag]) -> Table:
    """`status`'s view of them: one row per region with a cluster of its own."""
    table = Table(title="replication to regional clusters (MirrorMaker 2)", expand=True)
    for col in ("region", "command topic", "cluster", "records behind", "oldest not mirrored"):
        table.add_column(col)
    for lag in lags:
        if lag.records is None:
            behind, age = f"[red]unreachable ({lag.error})[/red]", "-"
        else:
            behind, age = str(lag.records), f"{lag.seconds or 0.0:.1f} s" if lag.records else "-"
        table.add_row(lag.region, lag.topic, lag.cluster, behind, age)
    return table
