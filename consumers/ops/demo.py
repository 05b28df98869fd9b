"""Realistic wedding traffic for `cachesync demo` and `run all --demo`.

A handful of weddings, each with a destination, guests from a few countries, a set
of vendors and photos, publish events the way the platform does: mostly photo
uploads in bursts, vendor profile edits, guest-portal updates, the odd wedding
change. Between events the demo plays the platform's readers, filling each region's
Redis cache so that purges have something real to delete.

`limit` counts every event produced, the opening ones (weddings published, vendors
linked) included. The rate is a target: `DemoStats` says what was achieved, so that a
demo that cannot keep up (a slow broker, a small machine) says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.ops.platform_cache import cache_put_many
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.settings import Settings

log = logging.getLogger(__name__)

CATEGORIES = [
    "photographer",
    "florist",
    "venue",
    "caterer",
    "band",
    "planner",
    "baker",
    "officiant",
]
DESTINATIONS = ["IT", "GR", "FR", "ES", "PT", "MX", "US", "TH", "ID", "JP", "AU", "HR", "DO", "MV"]
GUEST_COUNTRIES = ["US", "GB", "DE", "FR", "IN", "AU", "CA", "IT", "SG", "BR", "NL", "IE"]
PORTAL_PAGES = ["schedule", "travel", "rsvp", "registry", "faq", "accommodation"]

# Weights of a day on the platform: uploads dominate, weddings change rarely.
MIX: dict[str, int] = {
    "photo.uploaded": 40,
    "photo.updated": 12,
    "photo.deleted": 4,
    "album.published": 4,
    "vendor.updated": 10,
    "guest_portal.updated": 10,
    "wedding.updated": 5,
    "vendor.linked": 4,
    "vendor.unlinked": 2,
    "vendor_api.changed": 9,
}


@dataclass
class Wedding:
    wedding_id: str
    destination: str
    guest_countries: list[str]
    vendors: set[str] = field(default_factory=set)
    photos: list[str] = field(default_factory=list)
    albums: list[str] = field(default_factory=list)


class DemoWorld:
    """The weddings and vendors the demo invents, and the events that change them."""

    def __init__(self, *, weddings: int = 20, vendors: int = 40, seed: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.vendors = {f"v-{i:04d}": self.rng.choice(CATEGORIES) for i in range(vendors)}
        self.weddings: list[Wedding] = []
        self._photo_seq = 0
        for i in range(weddings):
            w = Wedding(
                wedding_id=f"w-{i:04d}",
                destination=self.rng.choice(DESTINATIONS),
                guest_countries=self.rng.sample(GUEST_COUNTRIES, self.rng.randint(1, 4)),
                albums=[f"a-{i:04d}-{j}" for j in range(self.rng.randint(1, 3))],
            )
            w.vendors = set(self.rng.sample(sorted(self.vendors), self.rng.randint(3, 6)))
            self.weddings.append(w)

    def opening_events(self) -> list[tuple[str, dict[str, Any]]]:
        """What already happened before the demo starts: weddings published, vendors booked."""
        out: list[tuple[str, dict[str, Any]]] = []
        for w in self.weddings:
            out.append(
                (
                    "wedding.published",
                    new_event(
                        "wedding.published",
                        wedding_id=w.wedding_id,
                        slug=f"{w.wedding_id}-and-guests",
                        destination_country=w.destination,
                        guest_countries=w.guest_countries,
                    ),
                )
            )
            for v in sorted(w.vendors):
                out.append(
                    (
                        "vendor.linked",
                        new_event(
                            "vendor.linked",
                            vendor_id=v,
                            wedding_id=w.wedding_id,
                            role=self.vendors[v],
                        ),
                    )
                )
        return out

    def next_event(self) -> tuple[str, dict[str, Any]]:
        event_type = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        w = self.rng.choice(self.weddings)
        make: dict[str, Callable[[], dict[str, Any]]] = {
            "photo.uploaded": lambda: self._photo_uploaded(w),
            "photo.updated": lambda: self._photo_event(
                "photo.updated", w, changed_fields=["caption"]
            ),
            "photo.deleted": lambda: self._photo_event("photo.deleted", w),
            "album.published": lambda: new_event(
                "album.published",
                wedding_id=w.wedding_id,
                album_id=self.rng.choice(w.albums),
                photo_ids=w.photos[-5:],
            ),
            "vendor.updated": lambda: new_event(
                "vendor.updated",
                vendor_id=self.rng.choice(sorted(w.vendors)),
                category="x",
                changed_fields=self.rng.sample(["prices", "portfolio", "bio", "logo"], 2),
            ),
            "guest_portal.updated": lambda: new_event(
                "guest_portal.updated",
                wedding_id=w.wedding_id,
                portal_id=f"p-{w.wedding_id}",
                pages=self.rng.sample(PORTAL_PAGES, 2),
            ),
            "wedding.updated": lambda: self._wedding_updated(w),
            "vendor.linked": lambda: self._link(w),
            "vendor.unlinked": lambda: self._unlink(w),
            "vendor_api.changed": lambda: new_event(
                "vendor_api.changed",
                vendor_id=self.rng.choice(sorted(w.vendors)),
                api=self.rng.choice(["availability", "prices", "portfolio", "reviews"]),
                resource=None,
            ),
        }
        record = make[event_type]()
        if event_type == "vendor.updated":
            record["category"] = self.vendors[record["vendor_id"]]
        return event_type, record

    def _photo_uploaded(self, w: Wedding) -> dict[str, Any]:
        self._photo_seq += 1
        photo = f"ph-{self._photo_seq:06d}"
        w.photos.append(photo)
        album = self.rng.choice([*w.albums, None])
        return new_event(
            "photo.uploaded",
            wedding_id=w.wedding_id,
            photo_id=photo,
            album_id=album,
            path=f"/weddings/{w.wedding_id}/photos/{photo}.jpg",
            content_type="image/jpeg",
            size_bytes=self.rng.randint(800_000, 12_000_000),
        )

    def _photo_event(self, event_type: str, w: Wedding, **extra: Any) -> dict[str, Any]:
        if not w.photos:
            return self._photo_uploaded(w)
        photo = self.rng.choice(w.photos)
        if event_type == "photo.deleted":
            w.photos.remove(photo)
        return new_event(
            event_type,
            wedding_id=w.wedding_id,
            photo_id=photo,
            album_id=None,
            path=f"/weddings/{w.wedding_id}/photos/{photo}.jpg",
            **extra,
        )

    def _wedding_updated(self, w: Wedding) -> dict[str, Any]:
        if self.rng.random() < 0.3:
            w.guest_countries = self.rng.sample(GUEST_COUNTRIES, self.rng.randint(1, 4))
        return new_event(
            "wedding.updated",
            wedding_id=w.wedding_id,
            destination_country=w.destination,
            guest_countries=w.guest_countries,
            changed_fields=["schedule"],
        )

    def _link(self, w: Wedding) -> dict[str, Any]:
        free = sorted(set(self.vendors) - w.vendors)
        v = self.rng.choice(free)
        w.vendors.add(v)
        return new_event(
            "vendor.linked", vendor_id=v, wedding_id=w.wedding_id, role=self.vendors[v]
        )

    def _unlink(self, w: Wedding) -> dict[str, Any]:
        if len(w.vendors) <= 2:
            return self._link(w)
        v = self.rng.choice(sorted(w.vendors))
        w.vendors.discard(v)
        return new_event("vendor.unlinked", vendor_id=v, wedding_id=w.wedding_id)

    def cache_entries(self, w: Wedding) -> list[tuple[str, list[str]]]:
        """The cache entries a guest's visit to this wedding leaves behind, with their tags."""
        entries: list[tuple[str, list[str]]] = [
            (f"wedding:{w.wedding_id}", [f"wedding:{w.wedding_id}"]),
            (f"wedding:{w.wedding_id}:gallery", [f"wedding:{w.wedding_id}:photos"]),
            (f"wedding:{w.wedding_id}:vendors", [f"wedding:{w.wedding_id}"]),
            (f"portal:p-{w.wedding_id}", [f"portal:p-{w.wedding_id}"]),
        ]
        for photo in w.photos[-10:]:
            entries.append((f"photo:{photo}", [f"photo:{photo}", f"wedding:{w.wedding_id}:photos"]))
        for album in w.albums:
            entries.append((f"wedding:{w.wedding_id}:album:{album}", [f"album:{album}"]))
        for v in w.vendors:
            entries.append((f"vendor:{v}", [f"vendor:{v}"]))
        return entries


# How far behind its schedule the demo may fall and still catch up (by sending without
# pausing); further behind, it starts a new schedule from now rather than burst.
CATCH_UP_S = 1.0


# The share of the demo's events whose traces the platform samples: a platform's tracing
# keeps a share, not every request. Sampling all of them costs `make run` a fifth of its
# events per second (the spans of every command in every sink).
DEMO_SAMPLED = 0.1

# How many guests' cache fills may be under way at once; the next one waits for a slot,
# so a slow Redis slows the demo down rather than piling up fills.
MAX_FILLS_IN_FLIGHT = 8


async def _fill(
    regions: Iterable[Redis], entries: list[tuple[str, bytes, list[str]]], stats: DemoStats
) -> None:
    # Cache-aside: what the guest's reads missed is written, what was cached stays.
    await asyncio.gather(
        *(cache_put_many(redis, entries, ttl_s=600, only_missing=True) for redis in regions)
    )
    stats.cache_fills += 1


class _Fills:
    """At most `limit` fills under way; `start` waits for a slot."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, fill: Coroutine[Any, Any, None]) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(fill)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.warning("demo: a guest's cache fill failed: %s", task.exception())

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.wait()


@dataclass
class DemoStats:
    produced: int = 0  # every event, the opening ones included
    cache_fills: int = 0
    started: float = field(default_factory=time.monotonic)
    rate_asked: float = 0.0
    # The paced traffic after the opening events: what the rate applies to.
    traffic: int = 0
    traffic_started: float | None = None
    traffic_ended: float | None = None
    # The newest event: its type, its id, and its entity as `trace` takes it ("--wedding w-0001").
    last_event: tuple[str, str, str] | None = None

    @property
    def achieved_rate(self) -> float | None:
        """Events per second of the paced traffic, None before two events."""
        if self.traffic_started is None or self.traffic < 2:
            return None
        end = self.traffic_ended or time.monotonic()
        return self.traffic / max(end - self.traffic_started, 1e-6)

    @property
    def behind(self) -> bool:
        """Whether the achieved rate is clearly below the rate asked for."""
        achieved = self.achieved_rate
        return achieved is not None and self.rate_asked > 0 and achieved < 0.9 * self.rate_asked


async def run_demo(
    settings: Settings,
    stop: asyncio.Event,
    *,
    rate: float = 20.0,
    weddings: int = 20,
    limit: int | None = None,
    seed: int | None = None,
    stats: DemoStats | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    sampled: float = DEMO_SAMPLED,
) -> DemoStats:
    """Publish the opening events, then the traffic mix at `rate` events/s until stopped
    or `limit` events (all of them counted) are out.

    Each event starts a trace, as the platform's would, sampled at the share
    `sampled`: the pipeline honours that decision (spans for a sampled event, none for
    the others; the audit trail, and so `trace`, has every event either way). The
    event offered to follow (`stats.last_event`) is a sampled one."""
    stats = stats or DemoStats()
    stats.rate_asked = rate
    world = DemoWorld(weddings=weddings, vendors=max(10, weddings * 2), seed=seed)
    # Trace ids and sampling draws of their own, so that a seed gives the same events.
    trace_ids = random.Random(None if seed is None else seed + 1)
    publisher = EventPublisher(settings)
    regions = {r: Redis.from_url(u) for r, u in settings.region_redis_urls.items()}
    fills = _Fills(MAX_FILLS_IN_FLIGHT)
    await publisher.start()
    try:
        for event_type, record in world.opening_events():
            if stop.is_set() or (limit is not None and stats.produced >= limit):
                break
            headers = telemetry.new_trace_headers(trace_ids, sampled=trace_ids.random() < sampled)
            await publisher.publish(event_type, record, headers=headers, wait=False)
            stats.produced += 1
        await publisher.flush()
        interval = 1.0 / rate if rate > 0 else 0.0
        next_at = stats.traffic_started = time.monotonic()
        while not stop.is_set() and (limit is None or stats.produced < limit):
            event_type, record = world.next_event()
            traced = trace_ids.random() < sampled
            headers = telemetry.new_trace_headers(trace_ids, sampled=traced)
            await publisher.publish(event_type, record, headers=headers, wait=False)
            stats.produced += 1
            stats.traffic += 1
            if traced or stats.last_event is None:
                entity = (
                    f"--wedding {record['wedding_id']}"
                    if record.get("wedding_id")
                    else f"--vendor {record.get('vendor_id')}"
                )
                stats.last_event = (event_type, str(record["event_id"]), entity)
            if on_event is not None:
                on_event(event_type, record)
            if world.rng.random() < 0.2:
                # A guest looks: the platform caches what they missed in every region. The
                # fill runs beside the publishing: awaited here, its three round trips set
                # the demo's pace whenever the process is busy (75 events/s of 200 asked
                # in `make run`, with every sink in the process).
                w = world.rng.choice(world.weddings)
                entries = [(key, b"cached", tags) for key, tags in world.cache_entries(w)]
                await fills.start(_fill(regions.values(), entries, stats))
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
            elif delay < -CATCH_UP_S:
                next_at = time.monotonic()  # far behind: a new schedule, not a burst
        stats.traffic_ended = time.monotonic()
        await publisher.flush()
        await fills.wait()
    finally:
        await fills.cancel()
        await publisher.stop()
        for redis in regions.values():
            await redis.aclose()
    return stats
