"""The warmer's fetch: its first try outside the retry loop keeps the policy's attempts."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import stamina

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
