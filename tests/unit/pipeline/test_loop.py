"""CommitAfterEffect with a fake consumer: commit after effect, put back on TransientError, stop."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from cachesync.consumers.errors import RetryAfter, TransientError
from cachesync.consumers.pipeline import loop as loop_module
from cachesync.consumers.pipeline.kafka import Record
from cachesync.consumers.pipeline.loop import TRICKLE_RECORDS, Backoff, CommitAfterEffect

TP0 = TopicPartition("cache.commands.eu-west", 0)
TP1 = TopicPartition("cache.commands.eu-west", 1)


def record(tp: TopicPartition, offset: int) -> Record:
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=b"v",
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=1,
        headers=[],
    )


class FakeConsumer:
    """Enough of AIOKafkaConsumer for the loop: a log and a position per partition.

    `getmany` hands out what lies past each unpaused partition's position (and moves
    it); `seek`, `pause`, `resume` and `commit` are recorded, and `commit` raises the
    errors queued in `commit_errors` first.
    """

    def __init__(self, logs: dict[TopicPartition, list[int]]) -> None:
        self.logs = {tp: [record(tp, o) for o in offsets] for tp, offsets in logs.items()}
        self.positions = {tp: (offsets[0] if offsets else 0) for tp, offsets in logs.items()}
        self.assigned = set(logs)
        self.paused: set[TopicPartition] = set()
        self.polls = 0
        self.idle = asyncio.Event()  # set by the first poll that found nothing
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_errors: list[Exception] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.pauses: list[tuple[TopicPartition, ...]] = []
        self.resumes: list[tuple[TopicPartition, ...]] = []
        self.fetch_size: int | None = None  # records one poll hands out at most
        self.end_offset_asks = 0

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        self.polls += 1
        batch: dict[TopicPartition, list[Record]] = {}
        budget = min(max_records or 10**9, self.fetch_size or 10**9)
        for tp in sorted(self.assigned - self.paused, key=lambda t: t.partition):
            part = [r for r in self.logs[tp] if r.offset >= self.positions[tp]][:budget]
            if part:
                batch[tp] = part
                budget -= len(part)
                self.positions[tp] = part[-1].offset + 1
        if not batch:
            self.idle.set()
            await asyncio.sleep(0.001)  # an empty poll waits a little, as a real one does
        return batch

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.commits.append(dict(offsets))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.positions[tp] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self.pauses.append(tps)
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.resumes.append(tps)
        self.paused.difference_update(tps)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.end_offset_asks += 1
        logs = self.logs
        return {
            tp: logs[tp][-1].offset + 1 if logs[tp] else self.positions[tp] for tp in partitions
        }

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


@dataclass
class Handler:
    """The batch handler (a sink's apply): each call takes the next outcome, then succeeds."""

    consumer: FakeConsumer
    outcomes: list[Exception | None] = field(default_factory=list)
    calls: list[list[tuple[TopicPartition, int]]] = field(default_factory=list)
    commits_seen: list[int] = field(default_factory=list)
    stop: asyncio.Event | None = None
    stop_on_call: int = 0

    async def __call__(self, records: list[Record]) -> None:
        self.calls.append([(TopicPartition(r.topic, r.partition), r.offset) for r in records])
        self.commits_seen.append(len(self.consumer.commits))
        await asyncio.sleep(0)
        if self.stop is not None and len(self.calls) == self.stop_on_call:
            self.stop.set()
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    clock = Clock()
    # Only the loop module's view of `time`: asyncio keeps the real clock.
    monkeypatch.setattr(loop_module, "time", clock)
    yield clock


def tiny_backoff() -> Backoff:
    # Delays in [0.005, 0.015] s.
    return Backoff(base=0.01, cap=0.01, rng=random.Random(7))


def make(
    logs: dict[TopicPartition, list[int]], *outcomes: Exception | None
) -> tuple[FakeConsumer, Handler, CommitAfterEffect]:
    consumer = FakeConsumer(logs)
    handler = Handler(consumer, list(outcomes))
    runner = CommitAfterEffect(
        consumer,  # type: ignore[arg-type]
        handler,
        name="test",
        poll_timeout_ms=1,
        backoff=tiny_backoff(),
    )
    return consumer, handler, runner


async def take(consumer: FakeConsumer) -> dict[TopicPartition, list[Record]]:
    return await consumer.getmany(timeout_ms=1, max_records=500)


async def test_offsets_are_committed_after_the_handler_as_last_offset_plus_one() -> None:
    """A successful batch commits last offset + 1 per partition, and only after the handler returned."""
    consumer, handler, runner = make({TP0: [5, 6, 7], TP1: [10]})

    assert await runner.process(await take(consumer)) is True

    assert handler.calls == [[(TP0, 5), (TP0, 6), (TP0, 7), (TP1, 10)]]
    assert handler.commits_seen == [0]
    assert consumer.commits == [{TP0: 8, TP1: 11}]
    assert runner.records_committed == 4
    assert consumer.seeks == [] and consumer.pauses == []


async def test_a_transient_error_commits_nothing_seeks_back_pauses_and_resumes_after_backoff(
    clock: Clock,
) -> None:
    """TransientError: no commit, each partition sought to its batch start and paused until the backoff passed."""
    consumer, _, runner = make({TP0: [5, 6, 7], TP1: [10, 11]}, TransientError("redis down"))

    assert await runner.process(await take(consumer)) is False

    assert consumer.commits == []
    assert runner.records_committed == 0
    assert sorted(consumer.seeks, key=lambda s: s[0].partition) == [(TP0, 5), (TP1, 10)]
    assert consumer.paused == {TP0, TP1}
    assert runner.paused == {TP0, TP1}
    assert runner.backoff.failures == 1

    clock.now += 0.0049  # under the smallest possible delay (base / 2)
    runner._resume_due()
    assert consumer.paused == {TP0, TP1}
    assert consumer.resumes == []

    clock.now += 0.011  # past the largest possible delay (cap + base / 2)
    runner._resume_due()
    assert consumer.paused == set()
    assert runner.paused == set()
    assert [set(r) for r in consumer.resumes] == [{TP0, TP1}]


async def test_retry_after_pauses_for_the_providers_delay_not_the_backoff(clock: Clock) -> None:
    """RetryAfter(…, 7.5) pauses the batch's partitions for exactly 7.5 s and leaves the backoff untouched."""
    consumer, _, runner = make({TP0: [3]}, RetryAfter("429 from cloudflare", 7.5))

    assert await runner.process(await take(consumer)) is False
    assert consumer.seeks == [(TP0, 3)]
    assert runner.backoff.failures == 0

    clock.now += 7.4
    runner._resume_due()
    assert consumer.paused == {TP0}

    clock.now += 0.1
    runner._resume_due()
    assert consumer.paused == set()
    assert consumer.commits == []


async def test_a_partition_revoked_while_paused_is_forgotten_not_resumed(clock: Clock) -> None:
    """A put-back partition that was revoked meanwhile is dropped from the paused set without resume()."""
    consumer, _, runner = make({TP0: [1], TP1: [1]}, TransientError("down"))
    await runner.process(await take(consumer))
    consumer.assigned = {TP1}

    clock.now += 60
    runner._resume_due()

    assert runner.paused == set()
    assert [set(r) for r in consumer.resumes] == [{TP1}]


async def test_success_after_failures_resets_the_backoff() -> None:
    """A batch that succeeds after put-backs resets the backoff's failure count."""
    consumer, _, runner = make({TP0: [1]}, TransientError("a"), TransientError("b"))
    batch = await take(consumer)
    assert await runner.process(batch) is False
    assert await runner.process(batch) is False
    assert runner.backoff.failures == 2

    assert await runner.process(batch) is True
    assert runner.backoff.failures == 0
    assert consumer.commits == [{TP0: 2}]


async def test_a_put_back_batch_is_re_read_after_the_backoff_and_committed_once() -> None:
    """run(): a batch failing with TransientError comes back from the same offsets and is committed once."""
    consumer, handler, runner = make({TP0: [5, 6], TP1: [9]}, TransientError("redis down"))
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 2

    await asyncio.wait_for(runner.run(stop), timeout=5)

    assert handler.calls[0] == handler.calls[1] == [(TP0, 5), (TP0, 6), (TP1, 9)]
    assert handler.commits_seen == [0, 0]
    assert consumer.commits == [{TP0: 7, TP1: 10}]
    assert consumer.paused == set()


@pytest.mark.parametrize(
    "error",
    [CommitFailedError("rebalanced"), IllegalStateError("not assigned"), KafkaError("broker")],
    ids=["CommitFailedError", "IllegalStateError", "KafkaError"],
)
async def test_a_failed_commit_does_not_crash_the_loop(error: Exception) -> None:
    """A commit that raises is logged and skipped: run() goes on and commits the next batch."""
    consumer, handler, runner = make({TP0: [1, 2, 3]})
    runner.max_records = 2
    consumer.commit_errors.append(error)
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 2

    await asyncio.wait_for(runner.run(stop), timeout=5)

    assert handler.calls == [[(TP0, 1), (TP0, 2)], [(TP0, 3)]]
    assert consumer.commits == [{TP0: 4}]
    assert runner.records_committed == 1


async def test_run_returns_once_stop_is_set_after_finishing_the_batch_in_hand() -> None:
    """Stop set during a batch: that batch is committed, the next one is never polled, run() returns."""
    consumer, handler, runner = make({TP0: [1, 2, 3]})
    runner.max_records = 2
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 1

    await asyncio.wait_for(runner.run(stop), timeout=5)

    assert handler.calls == [[(TP0, 1), (TP0, 2)]]
    assert consumer.commits == [{TP0: 3}]
    assert consumer.polls == 1


async def test_run_returns_when_stop_is_set_while_idle() -> None:
    """With nothing to read, run() returns soon after stop is set from outside."""
    consumer, handler, runner = make({TP0: []})
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await asyncio.wait_for(consumer.idle.wait(), timeout=1)
    await asyncio.sleep(0.01)  # a few more empty polls
    assert not task.done()

    stop.set()
    await asyncio.wait_for(task, timeout=1)

    assert handler.calls == []
    assert consumer.commits == []


def test_backoff_stays_within_its_cap_after_thousands_of_failures() -> None:
    """Past ~1,024 failures base * 2 ** n is no float: the delay keeps to base/2 .. cap + base/2."""
    backoff = Backoff(base=0.2, cap=30.0, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(5_000)]

    assert backoff.failures == 5_000
    assert all(0.1 <= d <= 30.1 for d in delays)
    assert max(delays[-100:]) > 15  # still spread over the whole capped range


async def test_the_next_batch_is_handled_while_the_commit_is_in_flight_and_commits_keep_order() -> (
    None
):
    """run(): a batch's commit goes out after its handler, and the next batch is handled
    without waiting for its answer; the commits still go out one at a time, in order."""
    consumer, handler, runner = make({TP0: [1, 2, 3]})
    runner.max_records = 1
    gates = [asyncio.Event() for _ in range(3)]
    started: list[dict[TopicPartition, int]] = []
    commit = consumer.commit

    async def slow_commit(offsets: dict[TopicPartition, int]) -> None:
        started.append(dict(offsets))
        await gates[len(started) - 1].wait()
        await commit(offsets)

    consumer.commit = slow_commit  # type: ignore[method-assign]
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 3
    task = asyncio.create_task(runner.run(stop))

    calls = [asyncio.Event() for _ in range(3)]
    handle = runner.handler

    async def counted(records: list[Record]) -> None:
        await handle(records)
        calls[len(handler.calls) - 1].set()

    runner.handler = counted

    async def handled(n: int) -> None:
        await calls[n - 1].wait()

    await asyncio.wait_for(handled(2), timeout=1)  # batch 2 handled, batch 1 not yet committed
    assert started == [{TP0: 2}] and consumer.commits == []
    gates[0].set()
    await asyncio.wait_for(handled(3), timeout=1)
    assert started == [{TP0: 2}, {TP0: 3}] and consumer.commits == [{TP0: 2}]
    gates[1].set()
    gates[2].set()
    await asyncio.wait_for(task, timeout=1)

    assert consumer.commits == [{TP0: 2}, {TP0: 3}, {TP0: 4}]
    assert runner.records_committed == 3


async def test_run_does_not_return_before_the_last_commit_is_answered() -> None:
    consumer, handler, runner = make({TP0: [1]})
    answered = asyncio.Event()
    commit = consumer.commit

    async def slow_commit(offsets: dict[TopicPartition, int]) -> None:
        await answered.wait()
        await commit(offsets)

    consumer.commit = slow_commit  # type: ignore[method-assign]
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 1
    task = asyncio.create_task(runner.run(stop))
    await asyncio.sleep(0.02)
    assert not task.done()

    answered.set()
    await asyncio.wait_for(task, timeout=1)
    assert consumer.commits == [{TP0: 2}]


async def test_with_an_interval_batches_share_a_commit_made_when_the_poll_comes_back_empty() -> (
    None
):
    """run() with commit_interval_ms: the batches handled within the interval are committed
    together (the last offset + 1 of each partition), at once when a poll finds nothing,
    and each batch is reported to on_handled when its effect is applied."""
    consumer, handler, runner = make({TP0: [1, 2, 3, 4], TP1: [7, 8]})
    runner.max_records = 1
    runner.commit_interval_ms = 60_000
    handled: list[int] = []
    runner.on_handled = handled.append
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await asyncio.wait_for(consumer.idle.wait(), timeout=1)
    await asyncio.sleep(0.01)

    # The first batch's commit went out at once (no commit yet in the interval); the
    # other five waited for the empty poll, and went out as one.
    assert consumer.commits == [{TP0: 2}, {TP0: 5, TP1: 9}]
    assert handled == [1] * 6
    assert runner.records_committed == 6
    assert max(handler.commits_seen) == 1
    stop.set()
    await asyncio.wait_for(task, timeout=1)
    assert len(consumer.commits) == 2


async def test_with_an_interval_what_is_applied_is_committed_on_stop_and_before_a_revoke() -> None:
    """Batches applied within the interval are committed before run() returns, and before
    the group takes the partitions away (the rebalance listener's revoke)."""
    consumer, _handler, runner = make({TP0: [1, 2, 3]})
    runner.commit_interval_ms = 60_000
    listener = runner.rebalance_listener()
    await runner.process(await consumer.getmany(max_records=1), wait_commit=False)
    runner._commit_due()  # the first commit of the interval goes out
    await runner.process(await consumer.getmany(max_records=1), wait_commit=False)
    runner._commit_due()  # within the interval: held
    await runner.committed()
    assert consumer.commits == [{TP0: 2}]

    await listener.on_partitions_revoked([TP0])
    assert consumer.commits == [{TP0: 2}, {TP0: 3}]

    await runner.process(await consumer.getmany(max_records=1), wait_commit=False)
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(runner.run(stop), timeout=1)
    assert consumer.commits == [{TP0: 2}, {TP0: 3}, {TP0: 4}]


async def test_batches_whose_before_commit_fails_are_read_again_and_never_committed_past() -> None:
    """run(): when what must precede a commit fails (a sink's audit records not acked),
    nothing is committed; the partitions are read again from the first batch of the
    failed commit, and once it succeeds the offsets are committed."""
    consumer, handler, runner = make({TP0: [1, 2, 3], TP1: [7]})
    runner.max_records = 2
    failures = [TransientError("audit records not acknowledged")]
    checks: list[int] = []

    async def before_commit() -> None:
        checks.append(len(handler.calls))
        if failures:
            raise failures.pop(0)

    runner.before_commit = before_commit
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 4
    await asyncio.wait_for(runner.run(stop), timeout=5)

    # Batch 1 (TP0 1-2) failed its commit: read again from offset 1 with what followed it.
    assert handler.calls[0] == [(TP0, 1), (TP0, 2)]
    assert (TP0, 1) in consumer.seeks
    assert handler.calls.count([(TP0, 1), (TP0, 2)]) == 2
    # TP0 is committed only after it was read again: never past the failed batch before.
    assert [c[TP0] for c in consumer.commits if TP0 in c] == [3, 4]
    committed: dict[TopicPartition, int] = {}
    for c in consumer.commits:
        committed.update(c)
    assert committed == {TP0: 4, TP1: 8}
    assert runner.records_committed == 4  # each record counted once, when committed
    assert len(checks) == len(consumer.commits) + 1  # one check per commit, one failed


async def test_a_loop_that_polls_late_sees_no_pause_while_records_wait_behind(
    clock: Clock,
) -> None:
    """A CDN sink gathers a burst until it pauses. A process too busy to poll for seconds
    has not seen a pause while the partitions' high-water marks say records are written
    behind the batch: its quiet time counts only once nothing is behind."""
    consumer, _, runner = make({TP0: [0, 1, 2]})
    behind = [True]
    consumer.highwater = lambda tp: 20 if behind[0] else None  # type: ignore[method-assign]
    seen: list[tuple[int, float]] = []

    def linger_for(count: int, oldest_ms: int, newest_ms: int, quiet_s: float) -> float:
        seen.append((count, quiet_s))
        clock.now += 5.0  # busy elsewhere for 5 s before the next poll
        if len(seen) == 2:
            behind[0] = False
        return 0.0 if len(seen) == 3 else 10.0

    runner.linger_for = linger_for
    await runner._linger(await take(consumer), asyncio.Event())

    assert seen[0] == (3 + 17, 0.0)  # offsets 3..19 written behind the batch
    assert seen[1] == (20, 0.0)  # 5 s without a record, but 17 wait behind: no pause
    assert seen[2] == (3, 10.0)  # nothing behind any more: the quiet time counts


async def test_a_batch_that_is_due_first_takes_the_records_written_behind_it(
    clock: Clock,
) -> None:
    """Records already written when the batch is due are fetched into it, and only
    those: a steady stream writing more on every poll cannot hold it."""
    consumer, _, runner = make({TP0: list(range(20))})
    consumer.fetch_size = 5  # a fetch brings 5: 15 wait behind the first
    consumer.highwater = lambda tp: len(consumer.logs[tp])  # type: ignore[method-assign]
    fetch = consumer.getmany

    async def streaming(*args: Any, **kwargs: Any) -> dict[TopicPartition, list[Record]]:
        got = await fetch(*args, **kwargs)
        consumer.logs[TP0].append(record(TP0, len(consumer.logs[TP0])))  # one more written
        return got

    consumer.getmany = streaming  # type: ignore[method-assign]
    runner.linger_for = lambda count, oldest_ms, newest_ms, quiet_s: 0.0  # due at once
    merged = await runner._linger(await take(consumer), asyncio.Event())

    # Due after the first poll, when offsets 0..20 were written: all of them, and no
    # more than the last fetch brought with them (the stream wrote one more per poll).
    offsets = [r.offset for r in merged[TP0]]
    assert offsets[:21] == list(range(21))
    assert len(offsets) < 21 + consumer.fetch_size


async def test_a_batch_due_with_stale_high_water_marks_asks_the_broker_what_is_behind(
    clock: Clock,
) -> None:
    """A process kept from polling holds the high-water marks of its last fetch (here:
    none). Before a batch that looks complete is handed over, the broker's end offsets
    say what is written behind it, in its partitions and in those it has no record of
    yet, and the batch takes those records: no flush of its own for them (a CDN call)."""
    consumer, _, runner = make({TP0: list(range(30)), TP1: [40, 41, 42, 43, 44]})
    consumer.fetch_size = TRICKLE_RECORDS  # the first fetch brings TP0's first ones only
    runner.linger_for = lambda count, oldest_ms, newest_ms, quiet_s: 0.0  # due at once
    merged = await runner._linger(await take(consumer), asyncio.Event())

    assert [r.offset for r in merged[TP0]] == list(range(30))
    assert [r.offset for r in merged.get(TP1, [])] == [40, 41, 42, 43, 44]
    assert consumer.end_offset_asks == 1  # asked once per batch, not per poll


async def test_a_trickle_batch_is_handed_over_without_asking_the_broker() -> None:
    """A batch of fewer than TRICKLE_RECORDS (a trickle's record or two) costs no
    ListOffsets round trip: what is behind it waits for the next batch."""
    consumer, _, runner = make({TP0: list(range(30))})
    consumer.fetch_size = TRICKLE_RECORDS - 1
    runner.linger_for = lambda count, oldest_ms, newest_ms, quiet_s: 0.0  # due at once
    merged = await runner._linger(await take(consumer), asyncio.Event())

    assert [r.offset for r in merged[TP0]] == list(range(TRICKLE_RECORDS - 1))
    assert consumer.end_offset_asks == 0


async def test_with_read_ahead_the_next_batch_is_prepared_while_the_handler_waits() -> None:
    """run() with `read_ahead`: each batch after the first is fetched and prepared while the
    handler of the one before waits on its backend, then handled next, in order; every
    record is handled once and committed only after its batch."""
    consumer, handler, runner = make({TP0: [1, 2, 3, 4, 5], TP1: [9]})
    runner.max_records = 2
    prepared: list[tuple[list[tuple[TopicPartition, int]], int, int]] = []

    def prepare(records: list[Record]) -> None:
        # What is prepared, how many batches were handed to the handler by then, and how
        # many of them had been committed.
        seen = [(TopicPartition(r.topic, r.partition), r.offset) for r in records]
        prepared.append((seen, len(handler.calls), len(consumer.commits)))

    runner.read_ahead = prepare
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 3

    await asyncio.wait_for(runner.run(stop), timeout=5)

    assert handler.calls == [[(TP0, 1), (TP0, 2)], [(TP0, 3), (TP0, 4)], [(TP0, 5), (TP1, 9)]]
    # Batch n+1 was prepared while batch n was in the handler, and handled right after.
    assert [(seen, calls) for seen, calls, _ in prepared] == [
        (handler.calls[1], 1),
        (handler.calls[2], 2),
    ]
    assert consumer.commits[-1] == {TP0: 6, TP1: 10}


async def test_a_batch_put_back_with_read_ahead_loses_nothing_read_ahead() -> None:
    """The batch is put back after the next was read ahead: the partitions read ahead are
    sought back to where the read-ahead began, so their records are handled all the same."""
    consumer, handler, runner = make({TP0: [1, 2], TP1: [5, 6]}, TransientError("redis down"))
    runner.max_records = 2
    runner.read_ahead = lambda records: None
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 3

    await asyncio.wait_for(runner.run(stop), timeout=5)

    assert handler.calls[0] == [(TP0, 1), (TP0, 2)]  # put back
    assert (TP1, 5) in consumer.seeks  # what was read ahead of it, sought back
    assert sorted(handler.calls[1:]) == [[(TP0, 1), (TP0, 2)], [(TP1, 5), (TP1, 6)]]
    committed: dict[TopicPartition, int] = {}
    for offsets in consumer.commits:
        committed.update(offsets)
    assert committed == {TP0: 3, TP1: 7}


@pytest.mark.parametrize(
    ("age_ms", "fetched", "first_batch"),
    [(60_000, 2, 4), (0, 2, 2), (60_000, 1, 1)],
    ids=["stale", "fresh", "stale-but-small"],
)
async def test_a_stale_batch_takes_the_records_written_since_in_one_more_poll(
    monkeypatch: pytest.MonkeyPatch, age_ms: int, fetched: int, first_batch: int
) -> None:
    """A batch of TRICKLE_RECORDS or more whose newest record is older than TOP_UP_MS was
    fetched while the last one was handled: one more poll adds what came since, instead of
    leaving it a batch behind. A fresh batch, or a trickle's record or two, goes as it is."""
    monkeypatch.setattr(loop_module, "TRICKLE_RECORDS", 2)
    consumer, handler, runner = make({TP0: [1, 2, 3, 4, 5, 6]})
    written = int(time.time() * 1000) - age_ms
    consumer.logs[TP0] = [replace(r, timestamp=written) for r in consumer.logs[TP0]]
    consumer.fetch_size = fetched
    runner.max_records = 10
    stop = asyncio.Event()
    handler.stop, handler.stop_on_call = stop, 1

    await asyncio.wait_for(runner.run(stop), timeout=5)

    assert handler.calls[0] == [(TP0, o) for o in range(1, 1 + first_batch)]
