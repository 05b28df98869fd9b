"""The warmer's fetch: its first try outside the retry loop keeps the policy's attempts, and
a flush's URLs go out pipelined, each once, a MISS once more, a failure through the retries."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import stamina

from cachesync.consumers.commands import WarmCommand, command_id
from cachesync.consumers.errors import TransientError
from cachesync.consumers.sinks.warmer import WarmerSink
from cachesync.topology.model import CdnPolicy, WarmPolicy


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    # No waits; the attempts stay the policy's (capped far above them).
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


def warmer(answers: list[int], seen: list[str]) -> WarmerSink:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        status = answers.pop(0) if answers else 200
        return httpx.Response(status, headers={"X-Cache": "HIT"})

    return WarmerSink(
        "eu-west",
        edge_url="http://edge.test",
        redis="redis://127.0.0.1:1/0",  # never reached: the fetch alone is tested
        policy=CdnPolicy(warm=WarmPolicy(attempts=3)),
        transport=httpx.MockTransport(answer),
    )


async def test_a_fetch_that_works_at_once_is_one_request() -> None:
    seen: list[str] = []
    sink = warmer([], seen)
    response = await sink._get("/weddings/w1/gallery")
    await sink.close()
    assert response.status_code == 200 and response.headers.get("x-cache") == "HIT"
    assert seen == ["/weddings/w1/gallery"]


async def test_a_failed_first_try_counts_as_the_first_of_the_attempts() -> None:
    """503 then 200: two requests. 503 every time: exactly `attempts` (3), then TransientError."""
    seen: list[str] = []
    sink = warmer([503], seen)
    assert (await sink._get("/a")).status_code == 200
    assert len(seen) == 2

    seen.clear()
    failing = warmer([503] * 10, seen)
    with pytest.raises(TransientError, match="after 3 attempts"):
        await failing._get("/b")
    assert len(seen) == 3
    await sink.close()
    await failing.close()


def _warm(event: str, *urls: str) -> WarmCommand:
    now = int(time.time() * 1000)
    return WarmCommand(
        command_id=command_id(event, "eu-west", "warm"),
        origin_event_id=event,
        origin_event_type="photo.uploaded",
        origin_occurred_at=now,
        region="eu-west",
        entity="wedding:w1",
        version=now,
        issued_at=now,
        wedding_id="w1",
        photo_urls=urls,
        deadline=now + 60_000,
    )


async def test_a_flush_fetches_each_url_once_and_only_a_miss_again() -> None:
    """Two warms naming the gallery: it is fetched once, and once more after its MISS; a
    page the edge already had (HIT) is not fetched again; both warms are confirmed."""
    seen: list[str] = []
    cached = {"/weddings/w1/albums/a1"}

    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        seen.append(path)
        status = "HIT" if path in cached else "MISS"
        cached.add(path)
        return httpx.Response(200, headers={"X-Cache": status})

    sink = WarmerSink(
        "eu-west",
        edge_url="http://edge.test",
        redis="redis://127.0.0.1:1/0",  # never reached: nothing fences these warms
        fenced_by=(),
        transport=httpx.MockTransport(answer),
    )
    one = _warm("e1", "/weddings/w1/gallery", "/weddings/w1/albums/a1")
    two = _warm("e2", "/weddings/w1/gallery")
    sink.add(one)
    sink.add(two)
    result = await sink.flush()
    await sink.close()
    assert sorted(seen) == sorted(["/weddings/w1/gallery"] * 2 + ["/weddings/w1/albums/a1"])
    assert result.applied == 2
    assert result.notes[one.command_id].cache_status == {
        "/weddings/w1/gallery": "HIT",
        "/weddings/w1/albums/a1": "HIT",
    }
    assert result.notes[two.command_id].cache_status == {"/weddings/w1/gallery": "HIT"}


async def test_a_5xx_in_a_pipelined_round_is_retried_on_its_own_within_the_attempts() -> None:
    """The gallery answers 503 to every try: exactly `attempts` (3) GETs of it, the first
    being the pipelined one, then the flush raises (its batch comes back whole)."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.endswith("gallery"):
            return httpx.Response(503)
        return httpx.Response(200, headers={"X-Cache": "HIT"})

    sink = WarmerSink(
        "eu-west",
        edge_url="http://edge.test",
        redis="redis://127.0.0.1:1/0",
        fenced_by=(),
        policy=CdnPolicy(warm=WarmPolicy(attempts=3)),
        transport=httpx.MockTransport(answer),
    )
    sink.add(_warm("e1", "/weddings/w1/gallery", "/weddings/w1/albums/a1"))
    with pytest.raises(TransientError, match="after 3 attempts"):
        await sink.flush()
    await sink.close()
    assert seen.count("/weddings/w1/gallery") == 3
    assert seen.count("/weddings/w1/albums/a1") == 1
