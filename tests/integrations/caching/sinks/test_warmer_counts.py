"""The warmer counts each warm once, however often its batch comes back, and is counted in
the applied metric (what `cachesync status` shows per sink). Against the region's Redis
and the local Varnish; whether the page was warmed is asked of Varnish."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

from cachesync.consumers.commands import PurgeCommand, WarmCommand, command_id
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.warmer import WarmerSink
from cachesync.topology.model import CdnPolicy
from tests.conftest import metric_points

EU = "eu-west"
POLICY = CdnPolicy(window_ms=200)


def _sum(reader: Any, name: str, **attrs: str) -> float:
    return sum(
        p.value
        for p in metric_points(reader, name)
        if all(p.attributes.get(k) == v for k, v in attrs.items())
    )


def _warm(run: str, event: str, url: str, version: int) -> WarmCommand:
    now = int(time.time() * 1000)
    return WarmCommand(
        command_id=command_id(f"{run}-{event}", EU, "warm"),
        origin_event_id=f"ev-{run}-{event}",
        origin_event_type="photo.uploaded",
        origin_occurred_at=version,
        region=EU,
        entity=f"wedding:w-{run}",
        version=version,
        issued_at=now,
        wedding_id=f"w-{run}",
        photo_urls=(url,),
        deadline=now + 60_000,
    )


async def test_a_batch_that_comes_back_is_not_counted_again(
    settings: Settings, edge: str, metric_reader: Any
) -> None:
    """One warm overtaken by a newer purge (dropped, fenced) and one warmed, flushed twice
    as a batch put back would be: each is counted once, dropped or applied."""
    run = uuid.uuid4().hex[:10]
    old_page, page = f"/weddings/w-{run}/albums/a1", f"/weddings/w-{run}/gallery"
    now = int(time.time() * 1000)
    purger = HttpPurgeSink(EU, edge_url=edge, redis=settings.region_redis_urls[EU], policy=POLICY)
    purger.add(
        PurgeCommand(
            command_id=command_id(f"{run}-new", EU, "purge"),
            origin_event_id=f"ev-{run}-new",
            origin_event_type="photo.uploaded",
            origin_occurred_at=now,
            region=EU,
            entity=f"wedding:w-{run}",
            version=2_000,
            issued_at=now,
            scope="wedding",
            urls=(old_page,),
        )
    )
    await purger.flush()
    await purger.close()
    fenced, warmed = _warm(run, "old", old_page, 1_000), _warm(run, "ok", page, 3_000)
    sink = WarmerSink(
        EU,
        edge_url=edge,
        redis=settings.region_redis_urls[EU],
        after=("http_purge",),
        policy=POLICY,
    )
    dropped_before = _sum(metric_reader, "cachesync.warm.dropped", region=EU, reason="fenced")
    applied_before = _sum(metric_reader, "cachesync.commands.applied", region=EU, sink="warmer")
    try:
        for _ in range(2):
            sink.add(fenced)
            sink.add(warmed)
            result = await sink.flush()
            assert result.applied == 1 and result.notes[fenced.command_id].outcome == "fenced"
    finally:
        await sink.close()
    dropped = _sum(metric_reader, "cachesync.warm.dropped", region=EU, reason="fenced")
    applied = _sum(metric_reader, "cachesync.commands.applied", region=EU, sink="warmer")
    assert dropped - dropped_before == 1
    assert applied - applied_before == 1
    async with httpx.AsyncClient(base_url=edge) as http:
        assert (await http.get(page)).headers["X-Cache"] == "HIT"
