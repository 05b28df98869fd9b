"""TimeWindow against the local Kafka: exact time bounds, fixed ends, empty windows, follow mode."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline.kafka import make_producer
from cachesync.consumers.settings import Settings

pytestmark = pytest.mark.integration

# (partition, timestamp, value) of one produced or read record.
Row = tuple[int, int, str]
MakeTopic = Callable[[int], Awaitable[str]]


@pytest.fixture
async def make_topic(settings: Settings) -> AsyncIterator[MakeTopic]:
    """Create topics of this test's own (CreateTime stamps); deleted at teardown."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers, client_id="test-window-admin"
    )
    await admin.start()
    created: list[str] = []

    async def make(partitions: int) -> str:
        name = f"{settings.topic_prefix}window-{uuid.uuid4().hex[:12]}"
        response = await admin.create_topics(
            [
                NewTopic(
                    name=name,
                    num_partitions=partitions,
                    replication_factor=1,
                    topic_configs={"message.timestamp.type": "CreateTime"},
                )
            ]
        )
        assert all(err[1] == 0 for err in response.topic_errors), response
        created.append(name)
        # Wait until the metadata shows every partition with a leader, so no test races it.
        for _ in range(100):
            (info,) = await admin.describe_topics([name])
            parts = info["partitions"]
            ready = len(parts) == partitions and all(part["leader"] >= 0 for part in parts)
            if info["error_code"] == 0 and ready:
                return name
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {name} has no leaders for its {partitions} partitions")

    try:
        yield make
    finally:
        if created:
            await admin.delete_topics(created)
        await admin.close()


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = make_producer(settings.kafka_bootstrap_servers, client_id="test-window-producer")
    await p.start()
    yield p
    await p.stop()


async def produce(producer: AIOKafkaProducer, topic: str, rows: list[Row]) -> None:
    """Send each row to its partition with its explicit timestamp, and wait for the acks."""
    futures = [
        await producer.send(topic, value=value.encode(), partition=partition, timestamp_ms=ts)
        for partition, ts, value in rows
    ]
    await asyncio.gather(*futures)


async def read_all(window: TimeWindow) -> list[tuple[str, Row, int]]:
    """Every record the window yields, as (topic, (partition, timestamp, value), offset)."""
    out = []
    async for records in window.batches():
        out += [(r.topic, (r.partition, r.timestamp, r.value.decode()), r.offset) for r in records]
    return out


def rows_of(read: list[tuple[str, Row, int]]) -> list[Row]:
    return [row for _, row, _ in read]


def assert_offsets_ascend(read: list[tuple[str, Row, int]]) -> None:
    last: dict[tuple[str, int], int] = {}
    for topic, (partition, _, _), offset in read:
        key = (topic, partition)
        assert offset > last.get(key, -1), f"{key}: offset {offset} after {last.get(key)}"
        last[key] = offset


def now_ms() -> int:
    return int(time.time() * 1000)


def layout(base: int) -> list[Row]:
    """Four partitions, timestamps rising in each, some exactly on the bounds base+20 / base+70."""
    rows: list[Row] = []
    for ts in range(0, 100, 10):  # partition 0: both bounds hit exactly
        rows.append((0, base + ts, f"p0-{ts}"))
    for ts in range(5, 100, 10):  # partition 1: bounds fall between records
        rows.append((1, base + ts, f"p1-{ts}"))
    for ts in (60, 70, 80):  # partition 2: only its first record is inside
        rows.append((2, base + ts, f"p2-{ts}"))
    for ts in (0, 10):  # partition 3: everything before the window
        rows.append((3, base + ts, f"p3-{ts}"))
    return rows


async def test_window_holds_exactly_the_records_between_since_and_until(
    settings: Settings, make_topic: MakeTopic, producer: AIOKafkaProducer
) -> None:
    """Across all partitions: since_ms <= timestamp < until_ms, each once, in offset order; total = count."""
    topic = await make_topic(4)
    base = now_ms() - 60_000
    rows = layout(base)
    await produce(producer, topic, rows)
    since, until = base + 20, base + 70
    expected = sorted(r for r in rows if since <= r[1] < until)
    # The bounds matter: a record sits on each, and partitions 1 and 2 add records inside.
    assert (0, since, "p0-20") in expected and (0, until, "p0-70") not in expected
    assert {p for p, _, _ in expected} == {0, 1, 2}

    async with TimeWindow(settings, [topic], since_ms=since, until_ms=until, max_records=3) as w:
        total = w.total
        read = await asyncio.wait_for(read_all(w), timeout=30)

    assert sorted(rows_of(read)) == expected
    assert len(read) == len(set(rows_of(read))), "a record came twice"
    assert_offsets_ascend(read)
    assert total == len(expected) == 5 + 5 + 1


async def test_window_reads_only_the_partitions_it_is_given(
    settings: Settings, make_topic: MakeTopic, producer: AIOKafkaProducer
) -> None:
    """Given TopicPartitions, only those partitions' in-window records come back."""
    topic = await make_topic(4)
    base = now_ms() - 60_000
    rows = layout(base)
    await produce(producer, topic, rows)
    since, until = base + 20, base + 70
    chosen = [TopicPartition(topic, 1), TopicPartition(topic, 2)]
    expected = sorted(r for r in rows if r[0] in (1, 2) and since <= r[1] < until)

    async with TimeWindow(settings, chosen, since_ms=since, until_ms=until) as w:
        total = w.total
        read = await asyncio.wait_for(read_all(w), timeout=30)

    assert sorted(rows_of(read)) == expected
    assert total == len(expected) == 6


async def test_window_over_several_topics_reads_each(
    settings: Settings, make_topic: MakeTopic, producer: AIOKafkaProducer
) -> None:
    """Two topics in one window: each topic's in-window records, tagged with their topic, total = count."""
    first, second = await make_topic(2), await make_topic(3)
    base = now_ms() - 60_000
    a = [(p, base + ts, f"a{p}-{ts}") for p in range(2) for ts in (0, 10, 20, 30)]
    b = [(p, base + ts, f"b{p}-{ts}") for p in range(3) for ts in (5, 15, 25, 35)]
    await produce(producer, first, a)
    await produce(producer, second, b)
    since, until = base + 10, base + 30
    expected = sorted(
        [(first, r) for r in a if since <= r[1] < until]
        + [(second, r) for r in b if since <= r[1] < until]
    )

    async with TimeWindow(settings, [first, second], since_ms=since, until_ms=until) as w:
        total = w.total
        read = await asyncio.wait_for(read_all(w), timeout=30)

    assert sorted((t, row) for t, row, _ in read) == expected
    assert total == len(expected) == 2 * 2 + 3 * 2


async def test_window_without_until_stops_at_the_ends_taken_at_start(
    settings: Settings, make_topic: MakeTopic, producer: AIOKafkaProducer
) -> None:
    """With no until_ms, records produced after entering (before and while reading) are left out."""
    topic = await make_topic(3)
    base = now_ms() - 60_000
    before = [(p, base + i, f"before-{p}-{i}") for p in range(3) for i in range(20)]
    await produce(producer, topic, before)
    since = base + 5
    expected = sorted(r for r in before if r[1] >= since)

    async with TimeWindow(settings, [topic], since_ms=since, max_records=4, poll_ms=100) as w:
        total = w.total
        # Newer records land after the ends were taken: before the first poll...
        await produce(producer, topic, [(p, now_ms(), f"late-{p}") for p in range(3)])
        stop = asyncio.Event()

        async def keep_producing() -> int:
            n = 0
            while not stop.is_set():  # ...and all the while the window is read.
                await produce(producer, topic, [(n % 3, now_ms(), f"during-{n}")])
                n += 1
                await asyncio.sleep(0.005)
            return n

        background = asyncio.create_task(keep_producing())
        try:
            read = await asyncio.wait_for(read_all(w), timeout=30)
        finally:
            stop.set()
            produced_during = await background

    assert produced_during > 0, "nothing was produced while the window was read"
    assert sorted(rows_of(read)) == expected
    assert len(read) == len(set(rows_of(read)))
    assert_offsets_ascend(read)
    assert total == len(expected) == 3 * 15


@pytest.mark.parametrize(
    ("since", "until"),
    [
        pytest.param(200, None, id="since-after-every-record"),
        pytest.param(200, 300, id="both-after-every-record"),
        pytest.param(-50, 0, id="until-at-the-first-record"),
        pytest.param(41, 50, id="gap-between-records"),
        pytest.param(30, 30, id="since-equals-until"),
    ],
)
async def test_empty_window_ends_at_once(
    settings: Settings,
    make_topic: MakeTopic,
    producer: AIOKafkaProducer,
    since: int,
    until: int | None,
) -> None:
    """A window with no record in it has total 0 and yields no batch at all (no poll)."""
    topic = await make_topic(2)
    base = now_ms() - 60_000
    await produce(
        producer, topic, [(p, base + ts, f"p{p}-{ts}") for p in range(2) for ts in (0, 20, 30, 40)]
    )

    started = time.monotonic()
    async with TimeWindow(
        settings,
        [topic],
        since_ms=base + since,
        until_ms=None if until is None else base + until,
        poll_ms=2_000,
    ) as w:
        total = w.total
        batches = [b async for b in w.batches()]
    elapsed = time.monotonic() - started

    assert total == 0
    assert batches == []
    assert elapsed < 2.0, f"an empty window took {elapsed:.1f}s"


async def test_empty_topic_window_ends_at_once(settings: Settings, make_topic: MakeTopic) -> None:
    """A topic with no records at all gives an empty window that ends without polling."""
    topic = await make_topic(3)
    async with TimeWindow(settings, [topic], since_ms=0, poll_ms=2_000) as w:
        total = w.total
        batches = await asyncio.wait_for(_collect(w), timeout=1.5)
    assert total == 0
    assert batches == []


async def _collect(window: TimeWindow) -> list[list[object]]:
    return [list(b) async for b in window.batches()]


async def test_follow_reads_new_records_and_returns_soon_after_the_event(
    settings: Settings, make_topic: MakeTopic, producer: AIOKafkaProducer
) -> None:
    """Following: in-window old records, then ones produced after start; ends within a poll of the event."""
    topic = await make_topic(3)
    base = now_ms() - 60_000
    old = [(p, base + ts, f"old-{p}-{ts}") for p in range(3) for ts in (0, 10, 20)]
    await produce(producer, topic, old)
    since = base + 10
    new = [(p, now_ms(), f"new-{p}-{i}") for p in range(3) for i in range(3)]
    wanted = {r[2] for r in old if r[1] >= since} | {r[2] for r in new}

    stop = asyncio.Event()
    seen: list[str] = []
    batches = 0
    empty_batches = 0
    got_all = asyncio.Event()

    async def follow(window: TimeWindow) -> None:
        nonlocal batches, empty_batches
        async for records in window.batches():
            batches += 1
            empty_batches += not records
            seen.extend(r.value.decode() for r in records)
            if wanted <= set(seen):
                got_all.set()

    async with TimeWindow(settings, [topic], since_ms=since, follow=stop, poll_ms=200) as w:
        assert w.total == 0
        reader = asyncio.create_task(follow(w))
        try:
            # Idle first: the follower gets empty batches, and stays running.
            await asyncio.sleep(1.0)
            assert not reader.done()
            await produce(producer, topic, new)
            await asyncio.wait_for(got_all.wait(), timeout=20)
            # Still following: more records keep coming in.
            await produce(producer, topic, [(0, now_ms(), "later")])
            for _ in range(100):
                if "later" in seen:
                    break
                await asyncio.sleep(0.05)
            assert "later" in seen
            assert not reader.done()

            set_at = time.monotonic()
            stop.set()
            await asyncio.wait_for(reader, timeout=5)
            took = time.monotonic() - set_at
        finally:
            stop.set()
            if not reader.done():
                reader.cancel()

    assert sorted(seen) == sorted(wanted | {"later"}), "a record was missed, repeated or too old"
    assert empty_batches > 0, "an idle poll should yield an empty batch"
    assert took < 1.0, f"returned {took:.2f}s after the event was set"


async def test_follow_and_until_are_exclusive(settings: Settings) -> None:
    """A window cannot both follow and end at until_ms."""
    with pytest.raises(ValueError):
        TimeWindow(settings, ["any"], since_ms=0, until_ms=1, follow=asyncio.Event())
