"""The warmer against the local Varnish edge and the region's Redis: HIT confirmation,
per-URL version fencing, expiry, and the runner's tier order in front of it.

Whether a page was warmed (or purged) is asked of Varnish itself (`X-Cache`,
`X-Origin-Generation`), never taken from the warmer's own results. Every test uses
pages of its own run, which no other test has cached.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import stamina

from cachesync.consumers.commands import PurgeCommand, WarmCommand, command_id
from cachesync.consumers.errors import RetryAfter
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.consumers.sinks.warmer import WarmerSink
from cachesync.topology.model import CdnPolicy, WarmPolicy

EU = "eu-west"
POLICY = CdnPolicy(window_ms=200)


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def http(edge: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge) as client:
        yield client


def now_ms() -> int:
    return int(time.time() * 1000)


def warm(
    run: str,
    event: str,
    *urls: str,
    version: int,
    issued_at: int | None = None,
    deadline: int | None = None,
) -> WarmCommand:
    return WarmCommand(
        command_id=command_id(f"{run}-{event}", EU, "warm"),
        origin_event_id=f"ev-{run}-{event}",
        origin_event_type="photo.uploaded",
        origin_occurred_at=version,
        region=EU,
        entity=f"wedding:w-{run}",
        version=version,
        issued_at=now_ms() if issued_at is None else issued_at,
        wedding_id=f"w-{run}",
        photo_urls=urls,
        deadline=now_ms() + 60_000 if deadline is None else deadline,
    )


def purge(run: str, event: str, *urls: str, version: int) -> PurgeCommand:
    return PurgeCommand(
        command_id=command_id(f"{run}-{event}", EU, "purge"),
        origin_event_id=f"ev-{run}-{event}",
        origin_event_type="photo.uploaded",
        origin_occurred_at=version,
        region=EU,
        entity=f"wedding:w-{run}",
        version=version,
        issued_at=now_ms(),
        scope="wedding",
        urls=urls,
    )


def warmer(settings: Settings, edge: str, *, after: tuple[str, ...], **warm: object) -> WarmerSink:
    policy = POLICY.model_copy(update={"warm": WarmPolicy(**warm)}) if warm else POLICY
    return WarmerSink(
        EU, edge_url=edge, redis=settings.region_redis_urls[EU], after=after, policy=policy
    )


async def purge_at_edge(settings: Settings, edge: str, *commands: PurgeCommand) -> None:
    """The region's HTTP-purge sink applies `commands`: Varnish drops the pages, the ledger
    records their versions (what the warmer fences by) and the applied markers."""
    purger = HttpPurgeSink(EU, edge_url=edge, redis=settings.region_redis_urls[EU], policy=POLICY)
    for command in commands:
        purger.add(command)
    result = await purger.flush()
    await purger.close()
    assert result.applied == len(commands) and not result.rejected


async def cached(http: httpx.AsyncClient, path: str) -> str:
    """Put `path` in the edge's cache; its origin generation."""
    await http.get(path)
    again = await http.get(path)
    assert again.headers["X-Cache"] == "HIT", path
    return again.headers["X-Origin-Generation"]


async def test_a_warm_fetches_through_the_edge_and_confirms_a_hit(
    settings: Settings, edge: str, http: httpx.AsyncClient, run: str
) -> None:
    """Pages not in the edge: fetched (MISS), fetched again and confirmed; then the edge has them."""
    pages = (f"/weddings/w-{run}/gallery", f"/weddings/w-{run}/photos/p1.jpg")
    sink = warmer(settings, edge, after=())
    command = warm(run, "e1", *pages, version=1_000)
    sink.add(command)
    result = await sink.flush()
    await sink.close()
    assert result.applied == 1
    assert result.notes[command.command_id].cache_status == dict.fromkeys(pages, "HIT")
    for page in pages:
        response = await http.get(page)
        assert response.headers["X-Cache"] == "HIT", page


async def test_without_confirmation_a_miss_is_fetched_once_and_not_confirmed(
    settings: Settings, edge: str, http: httpx.AsyncClient, run: str
) -> None:
    page = f"/weddings/w-{run}/gallery"
    sink = warmer(settings, edge, after=(), confirm=False)
    command = warm(run, "e1", page, version=1_000)
    sink.add(command)
    result = await sink.flush()
    await sink.close()
    assert result.notes[command.command_id].cache_status == {page: "MISS"}
    first = await http.get(page)
    assert first.headers["X-Cache"] == "HIT"  # the one GET put it in the cache
    assert first.headers["X-Cache-Hits"] == "1"  # and nobody asked for it since


async def test_fencing_is_per_url_a_warm_overtaken_on_every_url_is_dropped(
    settings: Settings, edge: str, http: httpx.AsyncClient, run: str
) -> None:
    """A newer purge of one page: the older warm fetches only the other page, and a warm
    of only that page is dropped as fenced; the newer purge's own warm will fetch it."""
    overtaken, other = f"/weddings/w-{run}/albums/a1", f"/weddings/w-{run}/gallery"
    before = {p: await cached(http, p) for p in (overtaken, other)}
    await purge_at_edge(
        settings,
        edge,
        purge(run, "old", overtaken, other, version=1_000),
        purge(run, "new", overtaken, version=2_000),
    )
    sink = warmer(settings, edge, after=("http_purge",))
    both = warm(run, "old", overtaken, other, version=1_000)
    only_overtaken = warm(run, "old-2", overtaken, version=1_500)
    sink.add(both)
    sink.add(only_overtaken)
    result = await sink.flush()
    await sink.close()
    assert result.applied == 1 and result.skipped == 1
    assert result.notes[only_overtaken.command_id].outcome == "fenced"
    assert result.notes[both.command_id].detail == "1 URLs left to a newer purge's warm"

    # The edge: the page nobody overtook is back and fresh; the overtaken one was not fetched.
    fresh = await http.get(other)
    assert fresh.headers["X-Cache"] == "HIT"
    assert fresh.headers["X-Origin-Generation"] != before[other]
    assert (await http.get(overtaken)).headers["X-Cache"] == "MISS"


async def test_an_expired_warm_is_dropped_without_a_fetch(
    settings: Settings, edge: str, http: httpx.AsyncClient, run: str
) -> None:
    page = f"/weddings/w-{run}/gallery"
    sink = warmer(settings, edge, after=())
    late = warm(run, "e1", page, version=1_000, deadline=now_ms() - 1)
    sink.add(late)
    result = await sink.flush()
    await sink.close()
    assert result.applied == 0 and result.notes[late.command_id].detail == "expired"
    assert (await http.get(page)).headers["X-Cache"] == "MISS"


async def test_the_runner_holds_warms_until_the_regions_purges_are_applied(
    settings: Settings, edge: str, http: httpx.AsyncClient, run: str
) -> None:
    """Tier order is the runner's: a warm waits for its event's purge in Redis and at the
    edge; one whose purge never came is handed over after max_wait_s and dropped."""
    page, lost = f"/weddings/w-{run}/gallery", f"/weddings/w-{run}/albums/lost"
    sink = warmer(settings, edge, after=("redis", "http_purge"))
    runner = SinkRole(settings, sink)  # not started: only its tier order is used here
    runner.HOLD_SLICE_S = 0.3  # how long one hold waits in the handler before putting back
    try:
        command = warm(run, "e1", page, version=1_000)
        with pytest.raises(RetryAfter) as caught:
            await runner.hold_for_earlier_tiers([command])
        assert caught.value.retry_after == 0  # read again at once, and waited for again
        assert runner.held_events == {command.origin_event_id}

        # Redis alone is not enough: the edge's purge sink has not applied the event yet.
        redis_sink = RedisSink(EU, settings.region_redis_urls[EU])
        redis_sink.add(purge(run, "e1", page, version=1_000))
        await redis_sink.flush()
        await redis_sink.close()
        with pytest.raises(RetryAfter):
            await runner.hold_for_earlier_tiers([command])
        await purge_at_edge(settings, edge, purge(run, "e1", page, version=1_000))
        await runner.hold_for_earlier_tiers([command])  # released

        issued_long_ago = now_ms() - int(POLICY.warm.max_wait_s * 1000) - 1_000
        orphan = warm(run, "e2", lost, version=1_000, issued_at=issued_long_ago)
        await runner.hold_for_earlier_tiers([command, orphan])  # handed over, not held
        sink.add(command)
        sink.add(orphan)
        result = await sink.flush()
        assert result.applied == 1
        assert result.notes[orphan.command_id].detail == "purge_not_applied"
    finally:
        await runner.stop()  # closes the sink too

    assert (await http.get(page)).headers["X-Cache"] == "HIT"
    assert (await http.get(lost)).headers["X-Cache"] == "MISS"
