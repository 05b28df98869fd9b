"""Reading topics between two times: the one reader that replay, trace and consistency share.

A `TimeWindow` reads some topics (every partition) or single partitions with no
consumer group, so no group's offsets move. It starts, per partition, at the first
record at or after `since_ms` and stops before the first one at or after `until_ms`,
or, with no end time, at the end offsets as they were when reading started: a
window always ends. Given a `follow` event instead, it keeps reading new records
until that event is set.

    async with TimeWindow(settings, [topic], since_ms=since) as window:
        async for records in window.batches():
            ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from aiokafka import TopicPartition

from cachesync.consumers.pipeline.kafka import KafkaConnection, Record, make_consumer, partitions_of
from cachesync.consumers.settings import Settings


class TimeWindow:
    """The records of `sources` (topic names or partitions) from `since_ms` to `until_ms`.

    `batches` yields one list per poll, in offset order within each partition, and
    an empty list when a poll found nothing (so a follower can do its other work).
    `total` is how many records the window holds (0 when following).
    """

    def __init__(
        self,
        settings: Settings,
        sources: Iterable[str | TopicPartition],
        *,
        since_ms: int,
        until_ms: int | None = None,
        follow: asyncio.Event | None = None,
        client_id: str = "cachesync-window",
        max_records: int = 1000,
        poll_ms: int = 500,
    ) -> None:
        if follow is not None and until_ms is not None:
            raise ValueError("a window follows the topic or ends at until_ms, not both")
        self.settings = settings
        self.sources = list(sources)
        self.since_ms = since_ms
        self.until_ms = until_ms
        self.follow = follow
        self.max_records = max_records
        self.poll_ms = poll_ms
        self.total = 0
        self._ends: dict[TopicPartition, int] = {}
        self._consumer = make_consumer(
            KafkaConnection.of(settings),
            group_id=None,
            client_id=client_id,
            max_partition_fetch_bytes=2 * 1024 * 1024,
            fetch_max_wait_ms=500,
        )

    async def __aenter__(self) -> TimeWindow:
        await self._consumer.start()
        try:
            await self._position()
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def batches(self) -> AsyncIterator[list[Record]]:
        """The window's records, a poll at a time, until its end (or, following, until the event)."""
        while self._reading():
            polled = await self._consumer.getmany(
                timeout_ms=self.poll_ms, max_records=self.max_records
            )
            yield self._inside(polled)
            await self._drop_finished()

    async def _position(self) -> None:
        """Assign the partitions that have records in the window and seek each to its start."""
        partitions = await self._partitions()
        end_now: dict[TopicPartition, int] = await self._consumer.end_offsets(partitions)
        starts = await self._offsets_at(self.since_ms, partitions, end_now)
        if self.follow is not None:
            self._consumer.assign(partitions)
        else:
            ends = end_now
            if self.until_ms is not None:
                ends = await self._offsets_at(self.until_ms, partitions, end_now)
            self._ends = {tp: ends[tp] for tp in partitions if starts[tp] < ends[tp]}
            self.total = sum(end - starts[tp] for tp, end in self._ends.items())
            self._consumer.assign(list(self._ends))
        for tp in self._consumer.assignment():
            self._consumer.seek(tp, starts[tp])

    async def _partitions(self) -> list[TopicPartition]:
        topics = [s for s in self.sources if isinstance(s, str)]
        named = [s for s in self.sources if isinstance(s, TopicPartition)]
        if topics:
            named += await partitions_of(KafkaConnection.of(self.settings), topics)
        return sorted(set(named), key=lambda tp: (tp.topic, tp.partition))

    async def _offsets_at(
        self, ms: int, partitions: list[TopicPartition], end_now: dict[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Per partition, the first offset at or after `ms` (the end when there is none)."""
        found = await self._consumer.offsets_for_times({tp: ms for tp in partitions})
        return {tp: (found[tp].offset if found.get(tp) else end_now[tp]) for tp in partitions}

    def _reading(self) -> bool:
        if self.follow is not None:
            return not self.follow.is_set()
        return bool(self._ends)

    def _inside(self, polled: dict[TopicPartition, list[Record]]) -> list[Record]:
        """The polled records before the window's end (all of them, following)."""
        if self.follow is not None:
            return [r for records in polled.values() for r in records]
        return [
            r for tp, records in polled.items() for r in records if r.offset < self._ends.get(tp, 0)
        ]

    async def _drop_finished(self) -> None:
        """Stop fetching the partitions read up to their end."""
        done = [tp for tp, end in self._ends.items() if await self._consumer.position(tp) >= end]
        for tp in done:
            del self._ends[tp]
        if done:
            self._consumer.pause(*done)
