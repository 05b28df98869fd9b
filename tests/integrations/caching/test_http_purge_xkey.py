"""The HTTP-purge sink purging URLs by their xkey, many per request, against the real varnishd.

deploy/varnish/default.vcl tags every object with a key for its own URL; a region with
`edge_purge: xkey` sends its URL purges as batches of those keys. The oracle is Varnish
itself: each page is fetched once after the purge, and `X-Varnish` says whether Varnish
served it from cache (two transaction ids: the request's and the cached object's) or
fetched it again (one), as the VCL's `X-Cache` does.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import replace
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.registry import build_sink
from cachesync.topology.model import CdnPolicy, HttpPurgePolicy
from tests.integrations.caching.crashes import (
    audit_records,
    committed_offsets,
    dies_after_flush,
    kill,
    own_topics,
    run_until_committed,
    run_until_hung,
    send_commands,
)
from tests.integrations.caching.test_sink_sampling import send_traced

EU = "eu-west"


def purge(run: str, n: int, *urls: str, version: int | None = None) -> PurgeCommand:
    at = version if version is not None else int(time.time() * 1000)
    return PurgeCommand(
        command_id=f"cmd-{run}-{n}",
        origin_event_id=f"ev-{run}-{n}",
        origin_event_type="photo.updated",
        origin_occurred_at=at,
        region=EU,
        entity=f"wedding:w-{run}-{n % 7}",
        version=at,
        issued_at=at,
        scope="wedding",
        urls=urls,
    )


def policy(**http_purge: Any) -> CdnPolicy:
    return CdnPolicy(http_purge=HttpPurgePolicy(**http_purge))


async def cache(http: httpx.AsyncClient, *paths: str) -> None:
    """Fetch each page until Varnish serves it from cache."""
    for path in paths:
        await http.get(path)
        assert await cached(http, path), f"{path} is not cached after a fetch"


async def cached(http: httpx.AsyncClient, path: str) -> bool:
    """Whether Varnish answers `path` from its cache (the fetch caches it again if not)."""
    response = await http.get(path)
    assert response.status_code == 200, path
    hit = len(response.headers["X-Varnish"].split()) == 2
    assert (response.headers["X-Cache"] != "MISS") == hit, response.headers
    return hit


async def test_a_batched_key_purge_drops_exactly_the_commanded_urls(
    settings: Settings, edge: str
) -> None:
    """40 URLs in 30 commands go as 3 xkey-purge requests of at most 16 keys: each of them
    is fetched again, while an unrelated page and pages whose URLs share a prefix with a
    purged one (longer name, child path, a query) stay cached."""
    run = uuid.uuid4().hex[:8]
    base = f"/weddings/w-{run}"
    commanded = [f"{base}/photos/p{i}" for i in range(40)]
    neighbours = [
        f"{base}/photos/p1x",  # p1 is purged: a longer name
        f"{base}/photos/p100",
        f"{base}/photos/p1/large",  # a path below a purged URL
        f"{base}/photos/p2?size=small",  # a query on a purged URL
        f"{base}/photos/p",
    ]
    unrelated = f"/vendors/v-{run}/portfolio"
    async with httpx.AsyncClient(base_url=edge) as http:
        await cache(http, *commanded, *neighbours, unrelated)
        sink = HttpPurgeSink(
            EU,
            edge_url=edge,
            redis=settings.region_redis_urls[EU],
            policy=policy(max_keys_per_request=16),
            edge_purge="xkey",
        )
        try:
            # Some commands name two URLs, one URL is named twice: 40 distinct URLs.
            for n in range(30):
                urls = [commanded[n]] + ([commanded[n + 10]] if 20 <= n + 10 < 40 else [])
                sink.add(purge(run, n, *urls))
            sink.add(purge(run, 30, commanded[39], commanded[0]))
            result = await sink.flush()
        finally:
            await sink.close()
        assert result.applied == 31 and not result.rejected
        assert sink.calls == 3, "40 keys at 16 per request"
        assert [p for p in commanded if await cached(http, p)] == []
        assert [p for p in [*neighbours, unrelated] if not await cached(http, p)] == []


async def test_url_keys_are_exact_for_commas_percent_signs_and_non_ascii(
    settings: Settings, edge: str
) -> None:
    """xkey splits keys on commas, and a URL is cached as a client sends it (percent-encoded):
    the purge of /a,b drops that page but not /a%2Cb (nor the reverse), and a URL with an
    accent is purged in the form the guest's browser fetched it."""
    run = uuid.uuid4().hex[:8]
    base = f"/weddings/w-{run}"
    comma, encoded_comma, accent = f"{base}/a,b", f"{base}/a%2Cb", f"{base}/café"
    async with httpx.AsyncClient(base_url=edge) as http:
        # httpx percent-encodes the accent on the wire, as a browser would.
        await cache(http, comma, encoded_comma, accent, f"{base}/a", f"{base}/b")
        sink = HttpPurgeSink(EU, edge_url=edge, policy=policy(), edge_purge="xkey")
        try:
            sink.add(purge(run, 0, comma, accent))
            assert (await sink.flush()).applied == 1
        finally:
            await sink.close()
        assert not await cached(http, comma)
        assert not await cached(http, accent)
        assert await cached(http, encoded_comma)
        assert await cached(http, f"{base}/a") and await cached(http, f"{base}/b")


async def test_keys_over_the_header_budget_go_in_more_requests_and_a_bad_tag_is_refused(
    settings: Settings, edge: str
) -> None:
    """With max_header_bytes 300 the URLs' keys (some 46 bytes each) go a few to a request,
    every one of them purged (Varnish refuses a longer header line than it allows); a tag
    holding a space cannot be one xkey key, so its command is refused and the others apply."""
    run = uuid.uuid4().hex[:8]
    pages = [f"/weddings/w-{run}/albums/album-{i:03d}/page" for i in range(23)]
    async with httpx.AsyncClient(base_url=edge) as http:
        await cache(http, *pages)
        sink = HttpPurgeSink(
            EU, edge_url=edge, policy=policy(max_header_bytes=300), edge_purge="xkey"
        )
        try:
            for n, page in enumerate(pages):
                sink.add(purge(run, n, page))
            bad = replace(purge(run, 99), tags=("two words",))
            sink.add(bad)
            result = await sink.flush()
        finally:
            await sink.close()
        assert result.applied == 23
        assert [r.command for r in result.rejected] == [bad]
        assert "cannot be an xkey key" in result.rejected[0].error
        key_bytes = len(keys.url_xkey(pages[0]))
        per_request = (300 + 1) // (key_bytes + 1)  # keys and the spaces between them
        assert sink.calls == math.ceil(len(pages) / per_request) > 1
        assert [p for p in pages if await cached(http, p)] == []


async def test_the_role_commits_after_the_purge_with_markers_fences_and_an_audit_per_command(
    settings: Settings, edge: str, region_redis: dict[str, Redis], telemetry: Any
) -> None:
    """The region's sink as the topology builds it (eu-west: xkey) in its role: 300 one-URL
    purges from Kafka are dropped from Varnish, each has its applied markers and URL fence
    in the region's Redis and an applied audit record, the offsets are committed, and the
    one command in a sampled trace has its apply span, with the flush's edge requests in
    one span of the same trace."""
    own = await own_topics(settings, "xkey")
    since = int(time.time() * 1000) - 1000
    run = uuid.uuid4().hex[:8]
    pages = [f"/weddings/w-{run}-{i % 7}/photos/p{i}" for i in range(300)]
    commands = [purge(run, n, page) for n, page in enumerate(pages)]
    sampled, trace_id = commands[42], uuid.uuid4().hex
    traceparents = [
        f"00-{trace_id if c is sampled else uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-"
        + ("01" if c is sampled else "00")
        for c in commands
    ]
    redis = region_redis[EU]
    # Edges after Redis: the region's Redis sink has applied these events.
    for cmd in commands:
        await redis.set(keys.applied_event("redis", cmd.origin_event_id), 1, ex=600)
    sink = build_sink(own, EU, "http_purge")
    assert isinstance(sink, HttpPurgeSink) and sink.edge_purge == "xkey"
    async with httpx.AsyncClient(base_url=edge) as http:
        await cache(http, *pages)
        await send_traced(own, list(zip(commands, traceparents, strict=True)))
        await run_until_committed(SinkRole(own, sink), len(commands))
        assert [p for p in pages if await cached(http, p)] == []
    assert sink.calls <= 6, "300 URLs at up to 256 keys (8,000 header bytes) per request"
    in_trace = [
        s
        for s in telemetry.span_exporter.get_finished_spans()
        if format(s.context.trace_id, "032x") == trace_id
    ]
    applies = [s for s in in_trace if s.name == "cachesync.apply http_purge"]
    assert [s.attributes["cachesync.command_id"] for s in applies] == [sampled.command_id]
    assert applies[0].attributes["cachesync.outcome"] == "applied"
    edge_spans = [s for s in in_trace if s.name == "cachesync.edge_purge"]
    assert len(edge_spans) == 1 and edge_spans[0].attributes["cachesync.edge_purge"] == "xkey"

    assert await committed_offsets(
        own, own.group_id("sink", EU, "http_purge"), own.commands_topic(EU)
    ) == len(commands)
    markers = await redis.mget(
        [keys.applied("http_purge", c.command_id) for c in commands]
        + [keys.applied_event("http_purge", c.origin_event_id) for c in commands]
    )
    assert None not in markers
    fences = await redis.mget(
        [keys.purge_version("http_purge", keys.url_target(c.urls[0])) for c in commands]
    )
    assert fences == [str(c.version).encode() for c in commands]
    records = [r for r in await audit_records(own, since) if r.sink == "http_purge"]
    assert sorted(r.command_id or "" for r in records) == sorted(c.command_id for c in commands)
    assert {r.outcome for r in records} == {"applied"}


async def test_a_redelivered_batch_is_not_purged_again(
    settings: Settings, edge: str, region_redis: dict[str, Redis]
) -> None:
    """A sink killed after its purge but before its commit: its successor reads the batch
    again and skips it (the flush ledger's markers), so the pages cached since stay cached,
    and audits each command as applied earlier."""
    own = await own_topics(settings, "xkey-redelivery")
    since = int(time.time() * 1000) - 1000
    run = uuid.uuid4().hex[:8]
    pages = [f"/weddings/w-{run}/photos/p{i}" for i in range(20)]
    commands = [purge(run, n, page) for n, page in enumerate(pages)]
    for cmd in commands:
        await region_redis[EU].set(keys.applied_event("redis", cmd.origin_event_id), 1, ex=600)
    url = own.region_redis_urls[EU]
    edge_url = own.region_edge_urls[EU]
    async with httpx.AsyncClient(base_url=edge) as http:
        await cache(http, *pages)
        await send_commands(own, commands)
        dying = dies_after_flush(HttpPurgeSink)(
            EU, edge_url=edge_url, redis=url, policy=own.topology.cdn, edge_purge="xkey"
        )
        role = SinkRole(own, dying)
        task = await run_until_hung(role)
        assert sorted(dying.flushed) == sorted(c.command_id for c in commands)
        await kill(role, task)
        # Cached again after the purge: a second purge would drop them.
        await cache(http, *pages)
        again = HttpPurgeSink(
            EU, edge_url=edge_url, redis=url, policy=own.topology.cdn, edge_purge="xkey"
        )
        await run_until_committed(SinkRole(own, again), len(commands))
        assert again.calls == 0
        assert [p for p in pages if not await cached(http, p)] == []
    records = [r for r in await audit_records(own, since) if r.sink == "http_purge"]
    later = {r.command_id: r for r in records if "redelivered" in r.detail}
    assert sorted(later) == sorted(c.command_id for c in commands)
    assert {r.outcome for r in later.values()} == {"applied"}


@pytest.mark.parametrize("mode", ["xkey", "purge"])
async def test_both_modes_purge_the_same_pages(settings: Settings, edge: str, mode: str) -> None:
    """The same commands in either mode leave the same pages cached and the same fetched again."""
    run = uuid.uuid4().hex[:8]
    purged = [f"/weddings/w-{run}/gallery", f"/weddings/w-{run}/albums/a1"]
    kept = [f"/weddings/w-{run}/albums/a10", f"/weddings/w-{run}/gallery/2"]
    async with httpx.AsyncClient(base_url=edge) as http:
        await cache(http, *purged, *kept)
        sink = HttpPurgeSink(EU, edge_url=edge, policy=policy(), edge_purge=mode)  # type: ignore[arg-type]
        try:
            sink.add(purge(run, 0, *purged))
            assert (await sink.flush()).applied == 1
        finally:
            await sink.close()
        assert sink.calls == (1 if mode == "xkey" else 2)
        assert [p for p in purged if await cached(http, p)] == []
        assert [p for p in kept if not await cached(http, p)] == []
