"""The report's invalidation cost, from a purge burst through `make run`-like traffic.

The real pipeline (mapper, eu-west's Redis sink, HTTP purge sink and warmer) runs with guests
reading one wedding's pages through the stack's Varnish and read-through from eu-west's Redis,
and the recorder writing what the varnishd and the Redis server report per request. A quiet
period (guests only) is followed by a burst of `wedding.updated` events. The report, built
from the command topics and the recorder's data alone, must show each purge's origin requests
after it well above what the quiet period's traffic caused on the same pages.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from redis.asyncio import Redis

from cachesync.consumers.ops.effectiveness.config import EffectivenessSettings
from cachesync.consumers.ops.effectiveness.gather import gather
from cachesync.consumers.ops.effectiveness.guests import Guests, pages_of
from cachesync.consumers.ops.effectiveness.recorder import Recorder
from cachesync.consumers.ops.effectiveness.store import EffectivenessStore, Outcome
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.registry import build_sink

EU = "eu-west"
WINDOW_S = 3.0
BURST = 4


async def test_a_purge_burst_costs_origin_requests_a_quiet_period_does_not(
    settings: Settings, topics: list[str], edge: str, run_roles_bg
) -> None:
    run = uuid.uuid4().hex[:8]
    wedding = f"w-eff-{run}"
    group = settings.model_copy(update={"group_prefix": f"{settings.group_prefix}-eff-{run}"})
    assert group.region_edge_urls[EU] == edge
    eff = EffectivenessSettings(interval_s=1.0, window_s=WINDOW_S)
    await run_roles_bg(
        [MapperRole(group)]
        + [
            SinkRole(group, build_sink(group, EU, kind), auto_offset_reset="latest")
            for kind in ("redis", "http_purge", "warmer")
        ]
    )
    recorder = Recorder(group, eff, enable_key_events=True)
    pages = pages_of(wedding, [f"v-eff-{run}"])
    guests = Guests(group, eff, rate=25, pages=[pages], regions=[EU], seed=1)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(recorder.run(stop)), asyncio.create_task(guests.run(stop))]
    try:
        await _until(lambda: all(e.listening for e in recorder.key_events.values()))
        await asyncio.sleep(3)  # guests fill the caches
        quiet_since = int(time.time() * 1000)
        await asyncio.sleep(8)
        quiet_until = burst_since = int(time.time() * 1000)
        publisher = EventPublisher(group)
        await publisher.start()
        try:
            for _ in range(BURST):
                await publisher.publish(
                    "wedding.updated",
                    new_event(
                        "wedding.updated",
                        wedding_id=wedding,
                        destination_country="FR",
                        guest_countries=["FR", "IE"],
                        changed_fields=["schedule"],
                    ),
                )
                await asyncio.sleep(WINDOW_S + 1)
        finally:
            await publisher.stop()
        await asyncio.sleep(2)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    burst_until = int(time.time() * 1000)
    assert guests.stats.views > 200 and guests.stats.errors == 0, guests.stats

    quiet = await gather(group, eff, since_ms=quiet_since, until_ms=quiet_until)
    burst = await gather(group, eff, since_ms=burst_since, until_ms=burst_until)

    assert not [c for c in quiet.costs if c.event_type == "wedding.updated"]
    costs = {c.tier: c for c in burst.costs if c.event_type == "wedding.updated"}
    edge_cost, redis_cost = costs["varnish"], costs["redis"]
    assert edge_cost.events == BURST and redis_cost.events == BURST
    # The edge's own log, for the purged pages, in the quiet period: the baseline rate.
    quiet_edge = await _edge_outcomes(group, eff, quiet_since, quiet_until, wedding)
    quiet_origin_per_window = (
        sum(o.origin("varnish") for o in quiet_edge) * WINDOW_S * 1000 / (quiet_until - quiet_since)
    )
    assert len(quiet_edge) > 20, f"too little quiet traffic in the edge's log: {guests.stats}"
    # Each purge drops /w/<id> and /weddings/<id>: at least those two are fetched again.
    assert edge_cost.per_event(edge_cost.origin_after) >= 2
    assert edge_cost.per_event(edge_cost.origin_after) > quiet_origin_per_window + 1
    assert edge_cost.origin_after > edge_cost.origin_before
    # In Redis, a guest's next read of wedding:<id> misses and writes it again.
    assert redis_cost.per_event(redis_cost.origin_after) >= 1
    assert redis_cost.misses_after >= BURST
    print(
        f"\nwedding.updated x{BURST}: edge {edge_cost.per_event(edge_cost.origin_after):.1f} origin "
        f"requests per event (before {edge_cost.per_event(edge_cost.origin_before):.1f}, quiet "
        f"{quiet_origin_per_window:.2f} per {WINDOW_S:g} s), warming saved "
        f"{edge_cost.per_event(edge_cost.warm_saved):.1f}; Redis "
        f"{redis_cost.per_event(redis_cost.origin_after):.1f} refills per event"
    )


async def _until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, "the recorder did not start listening"
        await asyncio.sleep(0.05)


async def _edge_outcomes(
    settings: Settings, eff: EffectivenessSettings, since: int, until: int, wedding: str
) -> list[Outcome]:
    state = Redis.from_url(str(settings.state_redis_url))
    try:
        entries = await EffectivenessStore(
            state, settings.group_prefix, retention_s=eff.retention_s
        ).read(since, until + 5_000)
    finally:
        await state.aclose()
    return [
        o
        for e in entries
        if e.kind == "requests" and e.data["tier"] == "varnish"
        for o in map(Outcome.from_row, e.data["rows"])
        if since <= o.at < until and f"/{wedding}" in o.resource
    ]
