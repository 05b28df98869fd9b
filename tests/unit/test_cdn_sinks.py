"""The Cloudflare and HTTP-purge sinks against httpx.MockTransport: bodies, limits, errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import stamina
from pydantic import SecretStr

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import CredentialsRejected, RetryAfter, TransientError
from cachesync.consumers.sinks.cloudflare import CloudflareSink, TokenBucket
from cachesync.consumers.sinks.cloudfront import caller_reference
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.topology.model import CdnPolicy, CloudflarePolicy

TOKEN = "sekrit-token-value"
_ids = itertools.count()


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


def purge(**fields: tuple[str, ...]) -> PurgeCommand:
    n = next(_ids)
    return PurgeCommand(
        command_id=f"cmd-{n}",
        origin_event_id=f"ev-{n}",
        origin_event_type="photo.uploaded",
        origin_occurred_at=1_000,
        region="eu-west",
        entity="wedding:w1",
        version=1_000,
        issued_at=1_000,
        scope="wedding",
        **fields,
    )


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, json={"success": True, "errors": [], "messages": [], "result": {"id": "x"}}
    )


def fail(status: int, code: int, message: str, **headers: str) -> httpx.Response:
    body = {"success": False, "errors": [{"code": code, "message": message}], "messages": []}
    return httpx.Response(status, json=body, headers=headers)


class Recorder:
    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] = ok) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    def bodies(self) -> list[dict[str, list[str]]]:
        return [json.loads(r.content) for r in self.requests]


def cloudflare(
    recorder: Callable[[httpx.Request], Any], *, rate: float = 1000.0, **policy: int
) -> CloudflareSink:
    cdn = CdnPolicy(cloudflare=CloudflarePolicy(rate_per_s=rate, burst=50, **policy))
    return CloudflareSink(
        "eu-west",
        zone=f"zone-{uuid.uuid4().hex[:8]}",
        token=SecretStr(TOKEN),
        public_url="https://eu.weddings.example",
        policy=cdn,
        api_url="https://cf.test",
        transport=httpx.MockTransport(recorder),
    )


async def test_cloudflare_sends_one_kind_per_request_with_bearer_and_full_urls() -> None:
    """Tags, files and prefixes go in separate calls; files are absolute URLs; the token is a bearer."""
    rec = Recorder()
    sink = cloudflare(rec)
    a = purge(urls=("/weddings/w1/gallery",), tags=("wedding:w1:photos", "album:a1"))
    b = purge(urls=("/weddings/w1/gallery",), prefixes=("/w/w1/",))
    sink.add(a)
    sink.add(b)
    result = await sink.flush()
    assert result.applied == 2 and not result.rejected
    assert rec.bodies() == [
        {"tags": ["album:a1", "wedding:w1:photos"]},
        {"files": ["https://eu.weddings.example/weddings/w1/gallery"]},
        {"prefixes": ["eu.weddings.example/w/w1/"]},
    ]
    assert all(r.url.path == f"/client/v4/zones/{sink.zone}/purge_cache" for r in rec.requests)
    assert rec.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    await sink.close()


async def test_cloudflare_batches_at_most_the_item_limit() -> None:
    """230 distinct URLs with a limit of 100 are three calls: 100, 100, 30."""
    rec = Recorder()
    sink = cloudflare(rec)
    for i in range(230):
        sink.add(purge(urls=(f"/weddings/w{i}/gallery",)))
    await sink.flush()
    assert [len(b["files"]) for b in rec.bodies()] == [100, 100, 30]
    await sink.close()


async def test_cloudflare_429_raises_retry_after_and_the_retry_sends_only_the_rest() -> None:
    """A 429 on the second call pauses with Retry-After; the retried batch does not resend the first."""
    throttle = iter([False, True])

    def answer(request: httpx.Request) -> httpx.Response:
        if next(throttle, False):
            return fail(429, 971, "Please wait", **{"Retry-After": "7"})
        return ok(request)

    rec = Recorder(answer)
    sink = cloudflare(rec)
    cmd = purge(urls=("/weddings/w1/gallery",), tags=("wedding:w1:photos",))
    sink.add(cmd)
    with pytest.raises(RetryAfter) as caught:
        await sink.flush()
    assert caught.value.retry_after == 7.0
    assert sink.throttled == 1
    sink.bucket.blocked_until = 0  # the runner waited Retry-After
    sink.add(cmd)  # the batch comes back
    result = await sink.flush()
    assert result.applied == 1
    assert rec.bodies() == [
        {"tags": ["wedding:w1:photos"]},
        {"files": ["https://eu.weddings.example/weddings/w1/gallery"]},
        {"files": ["https://eu.weddings.example/weddings/w1/gallery"]},
    ]
    await sink.close()


class Overlap:
    """An API that answers a call only once `wanted` calls are in flight together (or after
    `patience` seconds): the most it saw at once says whether a flush's calls overlap."""

    def __init__(self, wanted: int, patience: float = 2.0) -> None:
        self.wanted, self.patience = wanted, patience
        self.in_flight = self.most = 0
        self.bodies: list[dict[str, list[str]]] = []
        self._together = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight >= self.wanted:
            self._together.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._together.wait(), self.patience)
        self.in_flight -= 1
        return ok(request)


async def _most_at_once(api: Overlap, prepare: Callable[[CloudflareSink], None]) -> int:
    """The most calls in flight together for a photo event's flush (tag and pages)."""
    sink = cloudflare(api)
    prepare(sink)
    sink.add(purge(urls=("/weddings/w1/gallery",), tags=("album:a1",)))
    assert (await sink.flush()).applied == 1
    assert len(api.bodies) == 2
    await sink.close()
    return api.most


def _probing(sink: CloudflareSink) -> None:
    sink.outage.refused(CredentialsRejected("token refused"))
    sink.outage._next_try = 0  # the wait is over: this flush is the probe


async def test_cloudflare_sends_a_flushs_calls_together_one_at_a_time_while_blocked() -> None:
    """A photo event's flush is a call for its album's tag and one for its pages: both in
    flight at once (one after the other, the pages waited a whole round trip for the tag).
    With the bucket at its reserve, or while the sink is blocked (its token refused, the
    flush a probe), one at a time."""
    assert await _most_at_once(Overlap(wanted=2), lambda sink: None) == 2

    # A bucket down to its reserve (a burst): one at a time, as the rate allows anyway.
    def at_reserve(sink: CloudflareSink) -> None:
        sink.bucket.tokens = sink.bucket.reserve + 1

    assert await _most_at_once(Overlap(wanted=2, patience=0.2), at_reserve) == 1
    assert await _most_at_once(Overlap(wanted=2, patience=0.2), _probing) == 1


async def test_cloudflare_retries_5xx_then_succeeds() -> None:
    """Two 503s and then a 200: applied, in three attempts."""
    answers = iter([503, 503, 200])
    rec = Recorder(lambda r: ok(r) if next(answers) == 200 else fail(503, 10001, "busy"))
    sink = cloudflare(rec)
    sink.add(purge(tags=("t1",)))
    assert (await sink.flush()).applied == 1
    assert len(rec.requests) == 3
    await sink.close()


async def test_cloudflare_persistent_5xx_and_timeouts_are_transient() -> None:
    """After the attempts run out, a 5xx or a timeout becomes TransientError (the batch is retried)."""
    sink = cloudflare(Recorder(lambda r: fail(502, 10001, "bad gateway")))
    sink.add(purge(tags=("t1",)))
    with pytest.raises(TransientError, match="502"):
        await sink.flush()
    await sink.close()

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    sink = cloudflare(Recorder(timeout))
    sink.add(purge(tags=("t1",)))
    with pytest.raises(TransientError, match="ReadTimeout") as caught:
        await sink.flush()
    assert TOKEN not in str(caught.value)
    await sink.close()


async def test_cloudflare_400_is_bisected_so_only_the_bad_command_is_rejected() -> None:
    """One invalid tag in a request of many rejects only the command that asked for it."""

    def answer(request: httpx.Request) -> httpx.Response:
        tags = json.loads(request.content).get("tags", [])
        if "bad tag" in tags:
            return fail(400, 1019, "tags must not contain spaces")
        return ok(request)

    rec = Recorder(answer)
    sink = cloudflare(rec)
    good = [purge(tags=(f"t{i}",)) for i in range(7)]
    bad = purge(tags=("bad tag",))
    for cmd in [*good[:3], bad, *good[3:]]:
        sink.add(cmd)
    result = await sink.flush()
    assert result.applied == 7
    assert [r.command.command_id for r in result.rejected] == [bad.command_id]
    assert "1019" in result.rejected[0].error and "HTTP 400" in result.rejected[0].error
    purged = {t for b in rec.bodies() if "bad tag" not in b["tags"] for t in b["tags"]}
    assert purged == {f"t{i}" for i in range(7)}
    await sink.close()


async def test_cloudflare_403_pauses_the_sink_with_the_api_error_and_never_the_token() -> None:
    """A refused token is the sink's fault, not the command's: the batch is put back
    (CredentialsRejected, a RetryAfter) with Cloudflare's message, never the secret."""
    sink = cloudflare(Recorder(lambda r: fail(403, 10000, "Authentication error")))
    cmd = purge(tags=("t1",))
    sink.add(cmd)
    with pytest.raises(CredentialsRejected) as caught:
        await sink.flush()
    assert isinstance(caught.value, RetryAfter) and caught.value.retry_after > 0
    assert "10000 Authentication error" in str(caught.value)
    assert TOKEN not in str(caught.value) and TOKEN not in repr(sink.__dict__)
    await sink.close()


async def test_cloudflare_escalates_many_urls_of_one_wedding_to_a_prefix() -> None:
    """40 photo URLs of one wedding (threshold 30) become a single prefix purge."""
    rec = Recorder()
    sink = cloudflare(rec)
    sink.add(purge(urls=tuple(f"/weddings/w1/photos/p{i}.jpg" for i in range(40))))
    await sink.flush()
    assert rec.bodies() == [{"prefixes": ["eu.weddings.example/weddings/w1/"]}]
    await sink.close()


async def test_cloudflare_own_rate_budget_pauses_instead_of_sleeping_long() -> None:
    """With the zone's bucket empty and a slow refill, the flush asks to come back later."""
    rec = Recorder()
    sink = cloudflare(rec, rate=0.1)
    sink.bucket.tokens = 0
    sink.add(purge(tags=("t1",)))
    with pytest.raises(RetryAfter) as caught:
        await sink.flush()
    assert caught.value.retry_after > 1
    assert rec.requests == []
    await sink.close()


def test_token_bucket_refills_at_its_rate() -> None:
    """Burst first, then one token per 1/rate seconds."""
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert bucket.take() == 0 and bucket.take() == 0
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() == 0
    bucket.block(3.0)
    assert bucket.take() == pytest.approx(3.0)


async def test_http_purge_sends_purge_xkey_and_ban() -> None:
    """URLs are PURGEd one by one, tags go in one xkey-purge header, prefixes become a BAN."""
    rec = Recorder(lambda r: httpx.Response(200))
    sink = HttpPurgeSink("eu-west", edge_url="http://edge.test", transport=httpx.MockTransport(rec))
    sink.add(purge(urls=("/weddings/w1/gallery", "/weddings/w1/albums/a1"), tags=("a", "b")))
    sink.add(purge(prefixes=("/vendors/v-1/assets/",)))
    result = await sink.flush()
    assert result.applied == 2
    seen = sorted(
        (r.method, r.url.path, r.headers.get("xkey-purge"), r.headers.get("x-ban-url"))
        for r in rec.requests
    )
    assert seen == [
        ("BAN", "/", None, r"^/vendors/v\-1/assets/"),
        ("PURGE", "/", "a b", None),
        ("PURGE", "/weddings/w1/albums/a1", None, None),
        ("PURGE", "/weddings/w1/gallery", None, None),
    ]
    await sink.close()


async def test_http_purge_soft_uses_softpurge_header_and_405_is_rejected() -> None:
    """Soft purge sends xkey-softpurge; an edge that refuses (405) dead-letters the command."""
    rec = Recorder(lambda r: httpx.Response(405))
    sink = HttpPurgeSink(
        "eu-west", edge_url="http://edge.test", soft=True, transport=httpx.MockTransport(rec)
    )
    cmd = purge(tags=("a",))
    sink.add(cmd)
    result = await sink.flush()
    assert rec.requests[0].headers["xkey-softpurge"] == "a"
    assert (
        result.rejected and result.rejected[0].command == cmd and "405" in result.rejected[0].error
    )
    await sink.close()


async def test_http_purge_edge_down_is_transient() -> None:
    """A refused connection, after retries, puts the batch back."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    sink = HttpPurgeSink(
        "eu-west", edge_url="http://edge.test", transport=httpx.MockTransport(refuse)
    )
    sink.add(purge(urls=("/x/y",)))
    with pytest.raises(TransientError):
        await sink.flush()
    await sink.close()


def test_caller_reference_is_deterministic_per_command_set() -> None:
    """The same commands in any order give the same reference; another set, another one."""
    a = caller_reference("D1", ["c1", "c2", "c3"])
    assert a == caller_reference("D1", ["c3", "c1", "c2", "c1"])
    assert a != caller_reference("D1", ["c1", "c2"])
    assert a != caller_reference("D2", ["c1", "c2", "c3"])
    assert len(a) <= 128
