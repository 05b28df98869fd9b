"""The commit-after-effect loop: the project's at-least-once guarantee.

Offsets of a batch are committed only after its handler returned, i.e. after every
command was acked by the broker (mapper) or applied to the cache (sinks), and after
what it handed on was taken (`before_commit`: a sink's audit records acked); several
batches share a commit within `commit_interval_ms`. A `TransientError` puts the batch
back: its partitions are sought to the batch start and paused until the backoff (or the
provider's Retry-After) passes, so the process keeps serving other partitions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from cachesync.consumers import telemetry
from cachesync.consumers.errors import RetryAfter, TransientError
from cachesync.consumers.pipeline.kafka import Record

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[Record]], Awaitable[None]]
# Adaptive lingering: given the records gathered so far and those already written behind
# them (the partitions' high-water marks), the oldest and the newest gathered one's
# timestamps (epoch ms) and the seconds since a poll last brought any (0 while records are
# known to be written behind them: a busy process that polls late has not seen a pause),
# how many seconds more to gather (<= 0: hand the batch over now). A CDN sink's purge
# budget decides (sinks/cdn.py `coalesce_for`).
Linger = Callable[[int, int, int, float], float]

# The longest a batch that is due waits for the records written behind it before it was
# due (`_catching_up`): a CDN sink's batch put back and read again (the 10,000-event burst,
# sinks of 3 regions in one process on 2 cores) took 0.4 to 0.65 s to fetch the rest.
CATCH_UP_MAX_S = 2.0

# A batch of fewer records is a trickle's (a record or two at a time: at 100 events/s each
# event is a batch of its own in every process), and pays for no extra round trip: it is
# not topped up (`_top_up`; read late by a busy process it would wait for nothing, and at
# 100 events/s the Redis tier's p50 is some 20 ms: 5 ms would be a quarter of it), nor,
# lingering, checked against the broker's end offsets (`_written_behind`: a ListOffsets
# per CDN flush was CPU on a machine the pipeline already fills; a burst taken for a
# trickle costs a provider call more only once its batch is this large).
TRICKLE_RECORDS = 10

# A batch whose newest record was written longer ago than this is stale: the consumer
# fetched it while the last batch was being handled (aiokafka fetches a partition again
# only once what it buffered is consumed), and what was written since waits on the broker
# for the next fetch, a whole batch later. One more poll of at most this long takes it in
# this batch (`_top_up`). At 1,000 events/s the mapper's batches took ~45 ms and events
# waited about two of them.
TOP_UP_MS = 5

# 2 ** 62 times any sane base is past any cap: doubling further changes nothing.
_MAX_EXPONENT = 62


@dataclass
class Backoff:
    """Exponential backoff with full jitter for putting a batch back."""

    base: float = 0.2
    cap: float = 30.0
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        self.failures += 1
        # The exponent stops growing long after the cap is reached: 2 ** 1024 is no
        # float, and a multi-hour outage must not kill the loop with an OverflowError.
        exponent = min(self.failures - 1, _MAX_EXPONENT)
        return self.rng.uniform(0, min(self.cap, self.base * 2**exponent)) + self.base / 2

    def reset(self) -> None:
        self.failures = 0


@dataclass(slots=True)
class _Applied:
    """A partition's batches applied and not yet committed: the first offset of the first,
    the offset to commit (the last one's last + 1), and how many records they hold."""

    first: int
    end: int
    records: int


class CommitAfterEffect:
    """consume a batch -> handler -> commit; on TransientError pause, seek back, retry."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        handler: BatchHandler,
        *,
        name: str,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        backoff: Backoff | None = None,
        linger_ms: int = 0,
        group: str | None = None,
        commit_interval_ms: int = 0,
    ) -> None:
        self.consumer = consumer
        self.group = group
        self.handler = handler
        self.name = name
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.backoff = backoff or Backoff()
        # After the first records of a batch arrive, keep polling this long (up to
        # max_records) so that one handler call sees a whole coalescing window.
        self.linger_ms = linger_ms
        # When set, it decides instead of the fixed `linger_ms`, after every poll.
        self.linger_for: Linger | None = None
        self._paused_until: dict[TopicPartition, float] = {}
        self._lag_observed_at = 0.0
        self.records_committed = 0
        # Offsets are committed at most this often while batches keep coming (0: after
        # every batch), and at once when a poll comes back empty, on a rebalance and on
        # stop: every commit still covers only batches whose effect is applied.
        self.commit_interval_ms = commit_interval_ms
        # Per partition, its applied batches not yet committed; read again from their
        # first offset if what must precede their commit fails (`before_commit`).
        self._uncommitted: dict[TopicPartition, _Applied] = {}
        # Awaited before each commit: what the committed batches handed on must be safely
        # taken (a sink's audit records acknowledged). If it raises TransientError or a
        # KafkaError, nothing is committed and those batches are read again.
        self.before_commit: Callable[[], Awaitable[None]] | None = None
        self._read_again: dict[TopicPartition, int] = {}
        self._commit_started = 0.0
        self._committing: asyncio.Task[None] | None = None
        # Called with a batch's number of records once its effect is applied, before its
        # offsets are committed (a benchmark's window counts batches there).
        self.on_handled: Callable[[int], None] | None = None
        # When the loop last came back from a poll (monotonic): /healthz reads it from the
        # metrics server's thread (consumers/health.py). From creation, so that a loop that
        # never gets to poll is seen as stalled too.
        self.polled_at = time.monotonic()
        # Read-ahead (`_read_ahead`): when set, the next batch is fetched while the handler
        # waits on its backend, and given to this (a decode into a cache, say); it is
        # handled next, unless the batch before it is put back.
        self.read_ahead: Callable[[list[Record]], None] | None = None
        self._ahead: dict[TopicPartition, list[Record]] = {}

    def has_read_ahead(self) -> bool:
        """Whether the next batch is already read (`read_ahead`): records are waiting."""
        return bool(self._ahead)

    def since_poll(self) -> float:
        """Seconds since the loop last polled (or was created)."""
        return time.monotonic() - self.polled_at

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until `stop` is set; the batch in hand is finished and committed first.

        A commit goes out once `commit_interval_ms` has passed since the last one, or at
        once when a poll finds nothing, and the loop polls and handles the next batch
        while the broker answers it: the commit is a round trip to the group coordinator
        that nothing after it needs to wait for. At a steady trickle (100 events/s, a
        batch of one or two) a commit per batch was most of the loop's requests to Kafka.
        Commits go out in order, one at a time, each covering only batches whose effect
        is applied; a crash re-reads at most the last interval, which the sinks apply at
        most once in effect.
        """
        try:
            while not stop.is_set():
                if self._read_again:
                    await self._rewind()
                self._resume_due()
                await self._observe_lag()
                batch, self._ahead = self._ahead, {}
                if not batch:
                    batch = await self.consumer.getmany(
                        timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                    )
                self.polled_at = time.monotonic()
                if not batch:
                    self._commit_now()
                    continue
                if self.linger_ms > 0 or self.linger_for is not None:
                    batch = await self._linger(batch, stop)
                else:
                    batch = await self._top_up(batch)
                if self.read_ahead is None:
                    handled = await self.process(batch, wait_commit=False)
                else:
                    handled = await self._process_reading_ahead(batch, self.read_ahead)
                if handled:
                    self._commit_due()
        finally:
            self._ahead = {}
            await self.commit_applied()

    async def _top_up(
        self, batch: dict[TopicPartition, list[Record]]
    ) -> dict[TopicPartition, list[Record]]:
        """A stale batch (TOP_UP_MS) of TRICKLE_RECORDS or more with the records written
        since, if one more short poll brings them (the records are consecutive: the poll
        continues where the batch ends)."""
        count = sum(len(p) for p in batch.values())
        if not TRICKLE_RECORDS <= count < self.max_records:
            return batch
        newest = max((p[-1].timestamp for p in batch.values() if p), default=0)
        if time.time() * 1000 - newest < TOP_UP_MS:
            return batch
        more = await self.consumer.getmany(
            timeout_ms=TOP_UP_MS, max_records=self.max_records - count
        )
        if not more:
            return batch
        merged = {tp: list(part) for tp, part in batch.items()}
        for tp, part in more.items():
            merged.setdefault(tp, []).extend(part)
        return merged

    async def _process_reading_ahead(
        self, batch: dict[TopicPartition, list[Record]], prepare: Callable[[list[Record]], None]
    ) -> bool:
        """`process`, with the next batch fetched and prepared while the handler waits on
        its backend (the Redis sink: a fifth of its time was waiting for its script, and
        decoding the next batch is two fifths of its CPU).

        What is read ahead is only fetched, never handled or committed before this batch
        is: if this batch is put back, the partitions read ahead are sought back to where
        the read-ahead began (those of this batch already are, to its start).
        """
        handling = asyncio.ensure_future(self.process(batch, wait_commit=False))
        await asyncio.sleep(0)  # the handler runs up to its first wait
        if not handling.done():
            ahead = await self.consumer.getmany(timeout_ms=0, max_records=self.max_records)
            if ahead:
                prepare([r for part in ahead.values() for r in part])
                self._ahead = ahead
        handled = await handling
        if not handled:
            self._forget_ahead()
        return handled

    def _forget_ahead(self) -> None:
        """Drop the batch read ahead, its partitions sought back to its first records but
        those just put back (paused, and sought back further)."""
        ahead, self._ahead = self._ahead, {}
        assigned = self.consumer.assignment()
        for tp, part in ahead.items():
            if part and tp not in self._paused_until and tp in assigned:
                self.consumer.seek(tp, part[0].offset)

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        """For `consumer.subscribe`: commits what is applied before partitions go away."""
        return _CommitOnRevoke(self)

    async def _linger(
        self, batch: dict[TopicPartition, list[Record]], stop: asyncio.Event
    ) -> dict[TopicPartition, list[Record]]:
        merged = {tp: list(part) for tp, part in batch.items()}
        count = sum(len(p) for p in merged.values())
        oldest = min(p[0].timestamp for p in merged.values() if p)
        newest = max(p[-1].timestamp for p in merged.values() if p)
        deadline = time.monotonic() + self.linger_ms / 1000
        arrived = time.monotonic()
        # Once the batch is due: the partitions' high-water marks then (or their end offsets,
        # asked once: `_written_behind`), and until when the records written before it are
        # fetched (`_catching_up`).
        due: tuple[dict[TopicPartition, int], float] | None = None
        confirmed = False
        while count < self.max_records and not stop.is_set():
            if self.linger_for is not None:
                behind = self._behind(merged)
                quiet_s = 0.0 if behind else time.monotonic() - arrived
                left_ms = int(self.linger_for(count + behind, oldest, newest, quiet_s) * 1000)
                if left_ms <= 0 and due is None:
                    if behind:
                        due = (self._highwaters(merged), time.monotonic() + CATCH_UP_MAX_S)
                    elif not confirmed and count >= TRICKLE_RECORDS:
                        confirmed = True
                        due = await self._written_behind(merged)
                if left_ms <= 0 and due is not None:
                    left_ms = self._catching_up(merged, *due)
            else:
                left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = await self.consumer.getmany(
                timeout_ms=min(left_ms, self.poll_timeout_ms),
                max_records=self.max_records - count,
            )
            if more:
                arrived = time.monotonic()
            for tp, part in more.items():
                merged.setdefault(tp, []).extend(part)
                count += len(part)
                if part:
                    oldest = min(oldest, part[0].timestamp)
                    newest = max(newest, part[-1].timestamp)
        return merged

    def _highwaters(self, batch: dict[TopicPartition, list[Record]]) -> dict[TopicPartition, int]:
        return {tp: hw for tp in batch if (hw := self.consumer.highwater(tp)) is not None}

    async def _written_behind(
        self, batch: dict[TopicPartition, list[Record]]
    ) -> tuple[dict[TopicPartition, int], float] | None:
        """Before a batch that found nothing behind it is handed over: the broker's end
        offsets of the assigned partitions, as catch-up targets where records are written
        past what was read (None: nowhere). The high-water marks `_behind` reads come with
        fetches, and a process kept from polling holds stale ones: in one `make bench` run,
        a CloudFront sink sharing its process with the burst's publisher saw ~200 commands
        and nothing behind them two seconds into the burst, took the burst for a trickle
        and made two calls more than the minimum. Costs one ListOffsets round trip per
        flush of TRICKLE_RECORDS or more of a lingering (CDN) sink."""
        assigned = [tp for tp in self.consumer.assignment() if tp not in self._paused_until]
        if not assigned:
            return None
        try:
            ends = await self.consumer.end_offsets(assigned)
        except KafkaError as exc:  # the fetched view stands: hand over as decided
            log.debug("%s: end offsets unavailable: %s", self.name, exc)
            return None
        targets: dict[TopicPartition, int] = {}
        for tp, end in ends.items():
            part = batch.get(tp)
            read = part[-1].offset + 1 if part else await self.consumer.position(tp)
            if end > read:
                targets[tp] = end
        return (targets, time.monotonic() + CATCH_UP_MAX_S) if targets else None

    def _catching_up(
        self,
        batch: dict[TopicPartition, list[Record]],
        targets: dict[TopicPartition, int],
        until: float,
    ) -> int:
        """A batch that is due still takes the records written behind it before it was due
        (up to `targets`, for at most CATCH_UP_MAX_S): handed over without them, they would
        be a batch of their own, and a CDN provider's call of their own (seen in the
        10,000-event burst, after a batch put back was read again in part). Records written
        since do not extend the wait, so a steady stream cannot hold the batch."""
        for tp, target in targets.items():
            part = batch.get(tp)
            if not part or part[-1].offset + 1 < target:
                return max(0, int((until - time.monotonic()) * 1000))
        return 0

    def _behind(self, batch: dict[TopicPartition, list[Record]]) -> int:
        """Records already in the batch's partitions past its last ones (from the last fetch)."""
        behind = 0
        for tp, part in batch.items():
            highwater = self.consumer.highwater(tp)
            if part and highwater is not None:
                behind += max(0, highwater - part[-1].offset - 1)
        return behind

    async def process(
        self, batch: dict[TopicPartition, list[Record]], *, wait_commit: bool = True
    ) -> bool:
        """Handle the batch, then commit its offsets (True), or put it back (False). Without
        `wait_commit`, the commit is left in flight (`committed()` waits for it)."""
        records = [r for part in batch.values() for r in part]
        try:
            await self.handler(records)
        except TransientError as exc:
            delay = exc.retry_after if isinstance(exc, RetryAfter) else self.backoff.next_delay()
            self._put_back(batch, delay)
            telemetry.retries.add(1, {"consumer": self.name, "reason": type(exc).__name__})
            # A provider's Retry-After or a tier not yet applied is flow control, counted by
            # the retries metric; a failure (a Redis or an API down) is worth a warning.
            level = logging.DEBUG if isinstance(exc, RetryAfter) else logging.WARNING
            log.log(
                level, "%s: batch of %d put back for %.2fs: %s", self.name, len(records), delay, exc
            )
            return False
        self.backoff.reset()
        for tp, part in batch.items():
            if not part:
                continue
            applied = self._uncommitted.get(tp)
            if applied is None:
                self._uncommitted[tp] = _Applied(part[0].offset, part[-1].offset + 1, len(part))
            else:
                applied.end = part[-1].offset + 1
                applied.records += len(part)
        if self.on_handled is not None:
            self.on_handled(len(records))
        if wait_commit:
            await self.commit_applied()
        return True

    async def commit_applied(self) -> None:
        """Commit every batch applied so far now, and wait until every commit is answered."""
        self._commit_now()
        await self.committed()

    def _commit_due(self) -> None:
        """Start a commit if the interval since the last one has passed."""
        if time.monotonic() - self._commit_started >= self.commit_interval_ms / 1000:
            self._commit_now()

    def _commit_now(self) -> None:
        """Start committing every applied batch's offsets, behind the commit in flight."""
        if not self._uncommitted:
            return
        applied, self._uncommitted = self._uncommitted, {}
        self._commit_started = time.monotonic()
        self._committing = asyncio.create_task(self._commit(applied, self._committing))

    async def committed(self) -> None:
        """Until every commit started so far has been answered."""
        if self._committing is not None:
            committing = self._committing
            await committing
            if self._committing is committing:
                self._committing = None

    @property
    def paused(self) -> set[TopicPartition]:
        """Partitions whose batch was put back and waits for its retry time."""
        return set(self._paused_until)

    async def _observe_lag(self) -> None:
        """Consumer lag per partition (high-water mark minus position), at most once a second."""
        now = time.monotonic()
        if now - self._lag_observed_at < 1.0:
            return
        group = self.group or self.name
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            # Until a fetch brought a partition's high-water mark, there is nothing to
            # observe: the next poll tries again, so the lag shows from the first fetch.
            self._lag_observed_at = now
            position = await self.consumer.position(tp)
            telemetry.record_lag(group, tp.topic, tp.partition, max(0, highwater - position))

    def _put_back(self, batch: dict[TopicPartition, list[Record]], delay: float) -> None:
        until = time.monotonic() + delay
        for tp, part in batch.items():
            if not part:
                continue
            self.consumer.seek(tp, part[0].offset)
            self._paused_until[tp] = until
        self.consumer.pause(*batch.keys())

    def _resume_due(self) -> None:
        if not self._paused_until:
            return
        now = time.monotonic()
        due = [tp for tp, until in self._paused_until.items() if until <= now]
        for tp in due:
            del self._paused_until[tp]
        assigned = self.consumer.assignment()
        due = [tp for tp in due if tp in assigned]
        if due:
            self.consumer.resume(*due)

    async def _rewind(self) -> None:
        """Read again the batches whose `before_commit` failed: once no commit is left in
        flight (none of them may commit past them), each partition is sought back to the
        first of them, and what was handled after them is forgotten (it comes again)."""
        await self.committed()
        read_again, self._read_again = self._read_again, {}
        # Their records read ahead come again after the rewound ones.
        for tp in read_again:
            self._ahead.pop(tp, None)
        assigned = self.consumer.assignment()
        for tp, offset in read_again.items():
            self._uncommitted.pop(tp, None)
            if tp in assigned:
                self.consumer.seek(tp, offset)

    async def _commit(
        self, applied: dict[TopicPartition, _Applied], previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            await previous  # one at a time, in order (it logs its own failure)
        if self.before_commit is not None:
            try:
                await self.before_commit()
            except (TransientError, KafkaError) as exc:
                for tp, a in applied.items():
                    self._read_again[tp] = min(a.first, self._read_again.get(tp, a.first))
                log.warning("%s: not committed, its batches will be read again: %s", self.name, exc)
                return
        # A partition to be read again from before these offsets is not committed past them.
        offsets = {tp: a.end for tp, a in applied.items() if tp not in self._read_again}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance took the partitions away mid-batch: the new owner re-reads
            # from the last commit and applies again, which is harmless by design.
            log.warning("%s: commit skipped after rebalance: %s", self.name, exc)
            return
        except KafkaError as exc:
            log.warning("%s: commit failed, batch will be re-read: %s", self.name, exc)
            return
        self.records_committed += sum(applied[tp].records for tp in offsets)


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before the group takes partitions away, the loop commits what it has applied, so
    that their next owner does not apply the last interval's batches again."""

    def __init__(self, loop: CommitAfterEffect) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Records read ahead from partitions going away are their next owner's; those of
        # partitions that stay are kept (their position is past them).
        for tp in revoked:
            self.loop._ahead.pop(tp, None)
        await self.loop.commit_applied()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass
